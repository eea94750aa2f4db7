"""Reading the YAML an operator writes (policy files, the config file): safe, and strict about duplicate keys.

PyYAML keeps the last of two equal keys in a mapping without a word; in a document that sets caps and limits,
a repeated key is a mistake that would silently change a limit, so it is refused with its line.
"""

from __future__ import annotations

from typing import IO, Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise ConstructorError("while reading a mapping", node.start_mark,
                                           f"the key {key!r} appears twice", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]


def load(stream: str | bytes | IO[str] | IO[bytes]) -> Any:
    """Parse one YAML (or JSON) document safely; `yaml.YAMLError` for bad syntax or a key given twice."""
    return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
