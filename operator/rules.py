"""Cross-field rules of the GrokDeployment spec, each written once as a small expression that
renders to a CEL rule for the CRD and evaluates in Python for the operator's pydantic check.

A rule holds when any field it reads plainly is absent (None in Python, no key in CEL): such a
rule does not apply yet, and every rule then also holds on its schema node's raw `default: {}`,
which the API server evaluates at CRD creation without nested defaults
(../shared/k8s-apiserver-notes.md). A rule that needs a field says so with `present(...)`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic.alias_generators import to_camel


class Expr:
    """An expression over one schema node (`self`)."""

    def cel(self) -> str:
        raise NotImplementedError

    def value(self, node: Any) -> Any:
        raise NotImplementedError

    def fields(self) -> Iterator[Field]:
        """Fields read plainly (the rule does not apply while one is absent)."""
        yield from ()

    def __mul__(self, other: Expr | int) -> Expr:
        return Binary("*", self, wrap(other))

    def __mod__(self, other: Expr | int) -> Expr:
        return Binary("%", self, wrap(other))

    def __le__(self, other: Expr | int) -> Expr:
        return Binary("<=", self, wrap(other))

    def __ge__(self, other: Expr | int) -> Expr:
        return Binary(">=", self, wrap(other))

    def __and__(self, other: Expr) -> Expr:
        return Binary("&&", self, other)

    def __or__(self, other: Expr) -> Expr:
        return Binary("||", self, other)

    def __invert__(self) -> Expr:
        return Not(self)

    def equals(self, other: Expr | int | bool) -> Expr:
        return Binary("==", self, wrap(other))

    def divides(self, other: Expr) -> Expr:
        return (other % self).equals(0)

    def one_of(self, values: list[str]) -> Expr:
        return OneOf(self, tuple(values))


def wrap(value: Expr | int | bool) -> Expr:
    return value if isinstance(value, Expr) else Constant(value)


@dataclass(frozen=True, eq=False)
class Field(Expr):
    """`self.<path>`; the path in snake_case (Python's names), rendered in camelCase for CEL."""

    path: str

    @property
    def camel(self) -> str:
        return ".".join(to_camel(part) for part in self.path.split("."))

    def cel(self) -> str:
        return f"self.{self.camel}"

    def value(self, node: Any) -> Any:
        for part in self.path.split("."):
            node = None if node is None else getattr(node, part)
        return node

    def fields(self) -> Iterator[Field]:
        yield self

    def guards(self) -> list[str]:
        """`has()` of the field and of every object on its path (a missing parent is an error)."""
        parts = self.camel.split(".")
        return [f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts))]


@dataclass(frozen=True, eq=False)
class Constant(Expr):
    constant: int | bool

    def cel(self) -> str:
        return str(self.constant).lower() if isinstance(self.constant, bool) else str(self.constant)

    def value(self, node: Any) -> Any:
        return self.constant


@dataclass(frozen=True, eq=False)
class Present(Expr):
    field: Field

    def cel(self) -> str:
        return " && ".join(self.field.guards())

    def value(self, node: Any) -> Any:
        return self.field.value(node) is not None


def present(path: str) -> Expr:
    return Present(Field(path))


@dataclass(frozen=True, eq=False)
class Lookup(Expr):
    """`table[key]`, e.g. the kv heads of the chosen preset; `label` names it in messages."""

    label: str
    table: Mapping[str, int]
    key: Field

    def cel(self) -> str:
        entries = ", ".join(f"'{name}': {value}" for name, value in self.table.items())
        return f"{{{entries}}}[{self.key.cel()}]"

    def value(self, node: Any) -> Any:
        return self.table[self.key.value(node)]

    def fields(self) -> Iterator[Field]:
        yield self.key


@dataclass(frozen=True, eq=False)
class OneOf(Expr):
    operand: Expr
    values: tuple[str, ...]

    def cel(self) -> str:
        return f"{self.operand.cel()} in [{', '.join(repr(v) for v in self.values)}]"

    def value(self, node: Any) -> Any:
        return self.operand.value(node) in self.values

    def fields(self) -> Iterator[Field]:
        yield from self.operand.fields()


@dataclass(frozen=True, eq=False)
class Not(Expr):
    operand: Expr

    def cel(self) -> str:
        return f"!({self.operand.cel()})"

    def value(self, node: Any) -> Any:
        return not self.operand.value(node)

    def fields(self) -> Iterator[Field]:
        yield from self.operand.fields()


_PYTHON = {
    "*": lambda a, b: a * b,
    "%": lambda a, b: a % b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
}


@dataclass(frozen=True, eq=False)
class Binary(Expr):
    op: str
    left: Expr
    right: Expr

    def cel(self) -> str:
        return f"({self.left.cel()} {self.op} {self.right.cel()})"

    def value(self, node: Any) -> Any:
        if self.op == "&&":
            return self.left.value(node) and self.right.value(node)
        if self.op == "||":
            return self.left.value(node) or self.right.value(node)
        return _PYTHON[self.op](self.left.value(node), self.right.value(node))

    def fields(self) -> Iterator[Field]:
        yield from self.left.fields()
        yield from self.right.fields()


@dataclass(frozen=True)
class Rule:
    """`condition` must hold on the schema node at `scope` ("" is the spec itself); the API server
    reports a broken rule at `field` (a path below the scope), or at the scope itself."""

    scope: str
    condition: Expr
    message: str
    field: str | None = None

    def _fields(self) -> list[Field]:
        unique: dict[str, Field] = {}
        for field in self.condition.fields():
            unique.setdefault(field.path, field)
        return list(unique.values())

    def cel(self) -> dict[str, str]:
        guards = [guard for field in self._fields() for guard in field.guards()]
        # A key outside the table fails the CEL program ("no such key") next to the enum's error.
        guards += [
            lookup.key.one_of(list(lookup.table)).cel() for lookup in _lookups(self.condition)
        ]
        guards = list(dict.fromkeys(guards))
        rule = self.condition.cel()
        if guards:
            rule = f"!({' && '.join(guards)}) || {rule}"
        cel = {"rule": rule, "message": self.message}
        if self.field is not None:
            cel["fieldPath"] = f".{Field(self.field).camel}"
        return cel

    def holds(self, node: Any) -> bool:
        if any(field.value(node) is None for field in self._fields()):
            return True
        if any(lookup.key.value(node) not in lookup.table for lookup in _lookups(self.condition)):
            return True
        return bool(self.condition.value(node))

    def explain(self, node: Any) -> str:
        """The message with the values it was about, for the operator's Ready condition."""
        values = [f"{field.camel}={field.value(node)}" for field in self._fields()]
        values += [f"{lookup.label}={lookup.value(node)}" for lookup in _lookups(self.condition)]
        return f"{self.message} (here {', '.join(values)})"


def _lookups(expr: Expr) -> Iterator[Lookup]:
    if isinstance(expr, Lookup):
        yield expr
        return
    for child in vars(expr).values():
        if isinstance(child, Expr):
            yield from _lookups(child)


def failures(rules: list[Rule], scope: str, node: Any) -> list[str]:
    """The explained messages of the rules at `scope` that `node` breaks."""
    return [rule.explain(node) for rule in rules if rule.scope == scope and not rule.holds(node)]
