"""Checks of a single setting's value that need more than a range or a list of choices (declared
with `setting(..., check=...)` in `config.py`). This module never imports jax."""

from __future__ import annotations

import re
import string


def text_template(text: str) -> None:
    """`data.template`: {column} fields filled with each row's text. Raises ValueError for what cannot
    apply to text (format codes such as :d, conversions, attribute or index access) or cannot be parsed."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"is not a valid format string ({e}); use {{column}} fields and {{{{ }}}} for "
                         "literal braces") from None
    names = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    if not names:
        raise ValueError("has no {column} field, so every document would be the same text; name a column, "
                         "e.g. {abstract}")
    for name, spec, conv in names:
        shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not base or base.isdigit():
            raise ValueError(f"has a positional field {shown}; name the column, e.g. {{abstract}}")
        if base != name:
            raise ValueError(f"has {shown}: attribute and index access do not apply to a text column; "
                             f"write {{{base}}}")
        if conv:
            raise ValueError(f"has {shown}: a conversion does not apply to a text column; write {{{name}}}")
        try:
            format("", spec)
        except ValueError:
            raise ValueError(f"has {shown}: the format spec :{spec} does not apply to text; write {{{name}}}") from None
