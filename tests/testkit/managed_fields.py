"""Field ownership as kube-apiserver tracks it (metadata.managedFields), for the KMock API server.

A field set is the set of leaf paths an object (or an applied configuration) sets; maps are walked,
lists and scalars are leaves (atomic: the real server merges some lists by key, which no test here
depends on). Apply (`application/apply-patch+yaml`) records the manager's applied set, removes the
fields the same manager applied before and applies no more, and conflicts on fields another manager
set to another value. Every other write records the fields it changed for its manager (the
`fieldManager` parameter, else the client's User-Agent product, e.g. `OpenAPI-Generator` for the
Python client), and takes them from the other managers.
"""

from __future__ import annotations

import copy
from typing import Any

Path = tuple[str, ...]
APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
# Identity and server-set metadata: not fields anyone manages.
SERVER_METADATA = frozenset(
    {"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp"}
    | {"managedFields", "deletionTimestamp", "selfLink"}
)


def is_apply(headers: dict[str, str]) -> bool:
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    return content_type.split(";")[0].strip() == APPLY_CONTENT_TYPE


def manager_of(request: Any) -> str:
    explicit = request.params.get("fieldManager")
    if explicit:
        return explicit
    agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "unknown")
    return agent.split("/")[0] or "unknown"


def field_set(obj: Any, prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    if not isinstance(obj, dict):
        return paths
    for key, value in obj.items():
        if prefix == () and key in ("apiVersion", "kind"):
            continue
        if prefix == ("metadata",) and key in SERVER_METADATA:
            continue
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            paths |= field_set(value, path)
        else:
            paths.add(path)
    return paths


def encode(paths: set[Path]) -> dict[str, Any]:
    """A field set as `fieldsV1` (`{"f:spec": {"f:replicas": {}}}`)."""
    root: dict[str, Any] = {}
    for path in paths:
        node = root
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return root


def decode(fields: dict[str, Any], prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    for key, child in fields.items():
        path = (*prefix, key.removeprefix("f:"))
        paths |= decode(child, path) if child else {path}
    return paths


def value_at(obj: Any, path: Path) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


_MISSING = object()


def _overlaps(a: Path, b: Path) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def _entries(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj.setdefault("metadata", {}).setdefault("managedFields", [])


def _owned(entry: dict[str, Any]) -> set[Path]:
    return decode(entry.get("fieldsV1") or {})


def conflicts(current: dict[str, Any], applied: dict[str, Any], manager: str) -> list[str]:
    """Fields another manager owns that the applied configuration sets to another value."""
    found = []
    for entry in (current.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == manager and entry.get("operation") == "Apply":
            continue
        for path in field_set(applied):
            owned = any(_overlaps(path, theirs) for theirs in _owned(entry))
            if owned and value_at(current, path) != value_at(applied, path):
                found.append(f'conflict with "{entry["manager"]}": .{".".join(path)}')
    return sorted(set(found))


def _merge(target: Any, applied: Any) -> Any:
    if not isinstance(applied, dict) or not isinstance(target, dict):
        return copy.deepcopy(applied)
    result = dict(target)
    for key, value in applied.items():
        result[key] = _merge(result.get(key), value)
    return result


def _remove(obj: dict[str, Any], path: Path) -> None:
    parents = []
    node: Any = obj
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        parents.append((node, key))
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    # Maps left empty by the removal go too (they were only there to hold the removed field).
    for parent, key in reversed(parents):
        if parent[key] == {} and len(path) > 1 and key != "metadata":
            parent.pop(key)
        else:
            break


def applied_object(
    current: dict[str, Any], applied: dict[str, Any], manager: str
) -> dict[str, Any]:
    """The object after `manager` applies `applied` over `current` (forcing ownership)."""
    new = copy.deepcopy(current)
    before = set().union(
        *(
            _owned(e)
            for e in _entries(new)
            if e.get("manager") == manager and e.get("operation") == "Apply"
        )
    )
    now = field_set(applied)
    others = set().union(
        *(
            _owned(e)
            for e in _entries(new)
            if not (e.get("manager") == manager and e.get("operation") == "Apply")
        )
    )
    for path in before - now:
        if path not in others:
            _remove(new, path)
    for key, value in applied.items():
        if key == "metadata":
            meta = {k: v for k, v in value.items() if k not in SERVER_METADATA}
            new["metadata"] = _merge(new.get("metadata") or {}, meta)
        elif key != "status":
            new[key] = _merge(new.get(key), value)
    return new


def _record(
    obj: dict[str, Any],
    manager: str,
    operation: str,
    subresource: str | None,
    paths: set[Path],
    now: str,
    *,
    replace: bool,
) -> None:
    entries = _entries(obj)
    # The fields change hands: every other entry loses them.
    for entry in entries:
        if (entry.get("manager"), entry.get("operation")) == (manager, operation):
            continue
        kept = {p for p in _owned(entry) if not any(_overlaps(p, q) for q in paths)}
        entry["fieldsV1"] = encode(kept)
    mine = next(
        (
            e
            for e in entries
            if (e.get("manager"), e.get("operation"), e.get("subresource"))
            == (manager, operation, subresource)
        ),
        None,
    )
    owned = paths if replace or mine is None else _owned(mine) | paths
    if mine is None:
        mine = {"manager": manager, "operation": operation, "fieldsType": "FieldsV1"}
        if subresource:
            mine["subresource"] = subresource
        entries.append(mine)
    if mine.get("fieldsV1") != encode(owned):
        mine["fieldsV1"] = encode(owned)
        mine["time"] = now
    mine["apiVersion"] = obj.get("apiVersion", "")
    entries[:] = [e for e in entries if e.get("fieldsV1") or e is mine]


def record_apply(
    current: dict[str, Any], new: dict[str, Any], applied: dict[str, Any], manager: str, now: str
) -> None:
    _record(new, manager, "Apply", None, field_set(applied), now, replace=True)


def record_update(
    current: dict[str, Any],
    new: dict[str, Any],
    manager: str,
    subresource: str | None,
    now: str,
) -> None:
    changed = {
        path
        for path in field_set(new) | field_set(current)
        if value_at(new, path) != value_at(current, path) and value_at(new, path) is not _MISSING
    }
    if changed:
        _record(new, manager, "Update", subresource, changed, now, replace=False)
