"""The HTTP surface: proxy routes for agents, admin routes for operators."""
