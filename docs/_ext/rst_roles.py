"""A griffe extension for the documentation site (mkdocs.yml): ebflow's docstrings are
Google-style with reStructuredText roles and directives, which Markdown would show verbatim.

Rewritten before rendering:

* ``:math:`x``` -> ``\\(x\\)`` and a ``.. math::`` block -> ``$$ ... $$`` (pymdownx.arithmatex);
* ``:class:`~a.b.C``` (and ``func``, ``meth``, ``mod``, ``data``, ``attr``, ``exc``, ``obj``)
  -> a code span (``C`` with ``~``, else ``a.b.C``);
* a paragraph ending in ``::`` (a literal block follows) -> ``:``;
* an ``Example:`` section -> ``Examples:`` (Google style's name: its ``>>>`` lines are code),
  and ``>>>`` lines elsewhere -> a ``pycon`` code block;
* a method without a docstring that overrides a documented one of an ebflow base class gets the
  base's docstring, and ``extra_repr`` (a torch hook) is left off the pages.

Double backquotes (````x````) are already a Markdown code span.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const|ref):`([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_MATH_BLOCK = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _role(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    titled = re.fullmatch(r"(.*?)\s*<(.+)>", target)
    if titled:
        return f"`{titled.group(1)}`"
    short = target.startswith("~")
    target = target.lstrip("~").lstrip(".")
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _MATH_BLOCK.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, first = m.group(1), m.group(2)
        body = [first] if first.strip() else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out += ["", f"{indent}$$", *(f"{indent}{b}" for b in body if b), f"{indent}$$", ""]
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _doctest_blocks(lines: list[str]) -> list[str]:
    """Fence ``>>>`` runs outside an ``Examples:`` section (griffe renders those itself) as
    ``pycon`` code; unfenced, Markdown would read ``>>>`` as nested quotes."""
    out: list[str] = []
    section: int | None = None  # indent of the current Examples: header
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip():
            if section is not None and _indent(line) <= section:
                section = None
            if line.strip() == "Examples:":
                section = _indent(line)
        if section is None and line.lstrip().startswith(">>>"):
            pad = " " * _indent(line)
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(pad) :] if lines[i].startswith(pad) else lines[i].strip())
                i += 1
            out += ["", f"{pad}```pycon", *(pad + b for b in block), f"{pad}```", ""]
            continue
        out.append(line)
        i += 1
    return out


def to_markdown(text: str) -> str:
    """The docstring ``text`` with its reST roles and directives rewritten as Markdown."""
    text = _MATH.sub(lambda m: "\\(" + m.group(1) + "\\)", text)
    text = _ROLE.sub(_role, text)
    lines = _math_blocks(text.split("\n"))
    lines = [re.sub(r"(\S)::$", r"\1:", line) for line in lines]
    # Google style's section is "Examples:"; "Example:" would be an admonition of Markdown text
    lines = [re.sub(r"^(\s*)Example:$", r"\1Examples:", line) for line in lines]
    lines = _doctest_blocks(lines)
    return "\n".join(lines)


#: torch.nn.Module hooks that layers override: not ebflow's API, left off the pages.
HIDDEN = {"extra_repr"}


def _inherit_docstrings(obj: griffe.Object) -> None:
    """Give a method or property that overrides a documented one of an ebflow base class (and
    has no docstring of its own) the base's docstring, as ``inspect.getdoc`` would."""
    for member in list(obj.members.values()):
        if isinstance(member, griffe.Class):
            for name in HIDDEN & set(member.members):
                member.del_member(name)
            for name, sub in member.members.items():
                if isinstance(sub, griffe.Alias) or sub.docstring is not None:
                    continue
                for base in member.mro():
                    found = base.members.get(name)
                    if isinstance(found, griffe.Object) and found.docstring is not None:
                        sub.docstring = griffe.Docstring(found.docstring.value, parent=sub)
                        break
            _inherit_docstrings(member)
        elif isinstance(member, griffe.Module):
            _inherit_docstrings(member)


class RstRoles(griffe.Extension):
    """Rewrites every loaded docstring with :func:`to_markdown`, then lets overrides without a
    docstring inherit their base's."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _inherit_docstrings(pkg)
