"""MkDocs hook: in the CLI reference that mkdocs-click generates, show click's verbatim help
blocks (a paragraph opened by a ``\\b`` line: the examples in each command's --help) as
preformatted text, as ``--help`` prints them. mkdocs-click (0.9.0, pinned by the docs extra)
drops the ``\\b`` line and leaves the block to run on as one Markdown paragraph."""

from __future__ import annotations

VERBATIM = "\b"  # click's marker: the paragraph after it is printed as it is written


def fenced(lines):
    """The lines, each verbatim block (a ``\\b`` line up to the next blank line) as a text fence."""
    block = None
    for line in [*lines, ""]:
        if block is not None:
            if line.strip():
                block.append(line)
                continue
            indent = min(len(text) - len(text.lstrip()) for text in block) if block else 0
            yield from ["```text", *(text[indent:] for text in block), "```"]
            block = None
        if line.strip() == VERBATIM:
            block = []
        else:
            yield line


def on_config(config):
    try:
        from mkdocs_click import _docs, _extension
        generate = _docs._recursively_make_command_docs
    except (ImportError, AttributeError):  # another mkdocs-click: its own rendering stands
        return config

    def make_command_docs(*args, **kwargs):
        yield from fenced(generate(*args, **kwargs))

    _extension.make_command_docs = make_command_docs
    return config
