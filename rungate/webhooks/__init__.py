"""Webhooks (SPEC §8): endpoints as events, URL checks against SSRF, signed envelopes, and the deliverer
that sends them at least once, driven from the event log.

    urls.py       where a webhook may point (scheme, host, credentials, public addresses only)
    envelope.py   which log events become which webhook events; the body and its HMAC signature
    admin.py      the store commands and the operators' create / update / rotate / delete
    views.py      queries over the `webhooks` projection and the API's shapes
    deliver.py    the background deliverer: per-webhook cursors, retries, dead letters
"""
