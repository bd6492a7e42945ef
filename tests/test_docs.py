"""The documentation is tested with the code it describes (README.md, mkdocs.yml, docs/):

- the site builds with ``mkdocs build --strict``: a broken link or anchor fails;
- the generated CLI reference has every command and every option of the real CLI, the
  ``train`` plugin's included;
- every ``anime-udf …`` command in a code block of the README or a docs page parses against
  the real CLI (click's own parser, nothing run): a renamed or removed option fails;
- every document section that code cites by name (a document, a comma or "'s", then the
  section in double quotes) is a heading of that document.
"""

from __future__ import annotations

import ast
import html
import os
import re
import shlex
import subprocess
import sys
import tokenize
from pathlib import Path

import click
import pytest

from anime_udf.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PROG = "anime-udf"


# --- the site ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One strict build of the site into a temporary directory, for the tests that read it."""
    for module in ("mkdocs", "material", "mkdocs_click"):
        pytest.importorskip(module, reason="the docs extra: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                            str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return built, out


def test_site_builds_strict(site):
    built, out = site
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (out / "index.html").is_file() and (out / "cli.html").is_file()


def command_tree(command: click.Command = cli, path: tuple[str, ...] = ()):
    """(path, command) for the CLI and every subcommand, as ``anime-udf --help`` finds them
    (PluginGroup lists the entry-point commands, ``train`` among them)."""
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=" ".join((PROG, *path)))
        for name in command.list_commands(ctx):
            yield from command_tree(command.get_command(ctx, name), (*path, name))


def long_options(command: click.Command) -> list[str]:
    return [name for param in command.params if isinstance(param, click.Option) and not param.hidden
            for name in (*param.opts, *param.secondary_opts) if name.startswith("--")]


def sections(page: str) -> dict[str, str]:
    """Heading text -> the page's text from that heading to the next one."""
    headings = list(re.finditer(r"<h([1-6])[^>]*>(.*?)</h\1>", page, re.S))
    text = lambda fragment: html.unescape(re.sub(r"<[^>]+>", "", fragment))
    return {text(h.group(2)).replace("¶", "").strip(): text(page[h.end():nxt.start() if nxt else len(page)])
            for h, nxt in zip(headings, [*headings[1:], None])}


def test_cli_reference_has_every_command_and_option(site):
    built, out = site
    assert built.returncode == 0, built.stderr[-3000:]
    reference = sections((out / "cli.html").read_text())
    commands = list(command_tree())
    assert ("train",) in [path for path, _ in commands]  # the plugin is part of the tree
    missing = []
    for path, command in commands:
        title = " ".join((PROG, *path))
        if title not in reference:
            missing.append(f"command {title}")
            continue
        missing += [f"{title} {option}" for option in long_options(command)
                    if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", reference[title])]
    assert not missing, f"not in the generated CLI reference: {missing}"


# --- commands in the README and the pages ---------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")
MENTION = re.compile(r"(?:^|[\s/;&|])anime-udf(?:\s|$)")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "&", ";;"}
REDIRECTIONS = {">", ">>", "<", ">&", "<&"}


def code_blocks(text: str):
    """(first line number, lines) of each fenced code block."""
    block, start = None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block, start = [], number + 1
            else:
                yield start, block
                block = None
        elif block is not None:
            block.append(line)


def shell_words(line: str) -> list[str]:
    """The line's words and operators, its redirections (``> out``, ``2>> log``) left out."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    tokens = iter(lexer)
    for token in tokens:
        if token in REDIRECTIONS:
            next(tokens, None)  # the redirection's file
            if words and words[-1].isdigit():  # 2>> log: the 2 names the stream
                words.pop()
        else:
            words.append(token)
    return words


def commands_in(path: Path):
    """(where, argv after ``anime-udf``) of every anime-udf command in the page's code blocks:
    backslash-continued lines joined, a quoted argument running over lines kept whole."""
    for start, lines in code_blocks(path.read_text()):
        i = 0
        while i < len(lines):
            if not MENTION.search(lines[i]):
                i += 1
                continue
            first, command = i, lines[i]
            while command.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command.rstrip()[:-1] + " " + lines[i]
            while True:
                try:
                    words = shell_words(command)
                    break
                except ValueError:  # a quotation still open: the argument goes on on the next line
                    if i + 1 >= len(lines):
                        raise AssertionError(f"{path.name}:{start + first}: unbalanced quotes in {command!r}")
                    i += 1
                    command += "\n" + lines[i]
            simple: list[str] = []
            for word in [*words, ";"]:
                if word not in SEPARATORS:
                    simple.append(word)
                    continue
                while simple and ENV_ASSIGNMENT.match(simple[0]):
                    simple.pop(0)
                if simple and Path(simple[0]).name == PROG:
                    yield f"{path.relative_to(ROOT)}:{start + first}", simple[1:]
                simple = []
            i += 1


DOCUMENTED = [(where, argv) for page in PAGES for where, argv in commands_in(page)]


def parse(argv: list[str]) -> None:
    """Parse ``anime-udf ARGV`` as the CLI would, down to the subcommand, without running it:
    an unknown command or option, a bad value or a missing required option raises."""
    ctx = cli.make_context(PROG, list(argv), resilient_parsing=False)
    command = cli
    while isinstance(command, click.Group):
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            if command.invoke_without_command:
                return
            raise click.UsageError("a command is missing", ctx)
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx, resilient_parsing=False)


@pytest.fixture
def paths_need_not_exist(monkeypatch):
    """The pages name files of the reader's (catalog.parquet, /path/to/encoder): an option that
    checks its path exists is parsed here as if it did not check."""
    for _, command in command_tree():
        for param in command.params:
            if isinstance(param.type, click.Path) and param.type.exists:
                monkeypatch.setattr(param.type, "exists", False)


def test_the_pages_have_commands_to_check():
    wheres = [where for where, _ in DOCUMENTED]
    assert any(where.startswith("README.md:") for where in wheres)
    assert len(wheres) > 50, wheres


@pytest.mark.parametrize("where, argv", DOCUMENTED, ids=[where for where, _ in DOCUMENTED])
def test_documented_command_parses(where, argv, paths_need_not_exist, capsys):
    try:
        parse(argv)
    except click.exceptions.Exit as exit_:  # --help, --version
        assert exit_.exit_code == 0
    except click.ClickException as exc:
        pytest.fail(f"{where}: `{PROG} {shlex.join(argv)}` does not parse: {exc.format_message()}")


def test_a_stale_option_fails_the_check(paths_need_not_exist):
    """The check itself: a removed option or command is an error, not ignored."""
    with pytest.raises(click.NoSuchOption):
        parse(["score", "--data", "catalog.parquet", "--out", "x.parquet", "--no-such-flag"])
    with pytest.raises(click.UsageError):
        parse(["no-such-command"])
    with pytest.raises(click.UsageError):
        parse(["cache", "prune", "--older-than", "90d", "--no-such-flag"])
    parse(["train", "fusion", "--data", "catalog.parquet", "--backbone", "/no/such/encoder"])


# --- the README's links ----------------------------------------------------------------------

def test_readme_links_point_at_files():
    readme = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+:|#", t)]
    assert targets
    assert not [t for t in targets if not (ROOT / t.split("#")[0]).exists()]


# --- sections cited from code -----------------------------------------------------------------

CITATION = re.compile(r"""(?P<doc>\bREADME(?:\.md)?|\b(?:docs/)?[A-Za-z0-9_-]+\.md)(?:'s|,)\s+"(?P<section>[^"]{1,100})\"""")
CODE_DIRS = ("anime_udf", "training", "benchmarks", "tests", "examples", "fixtures")


def texts(path: Path):
    """(line, text) of the file's lines and comments, then of its string constants (adjacent
    literals joined, as Python joins them: a citation may be split over two literals)."""
    source = path.read_text()
    yield from enumerate(source.splitlines(), 1)
    with path.open("rb") as f:
        for token in tokenize.tokenize(f.readline):
            if token.type == tokenize.COMMENT:
                yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def citations() -> list[tuple[str, str, str]]:
    """(file:line, document, section) of every citation; a citation found on a line is not
    reported again from the string constant it is part of."""
    found: dict[tuple[str, str, str], int] = {}
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue
            for line, text in texts(path):
                for match in CITATION.finditer(text):
                    key = (str(path.relative_to(ROOT)), match["doc"], " ".join(match["section"].split()))
                    found.setdefault(key, line)
    return sorted((f"{file}:{line}", doc, section) for (file, doc, section), line in found.items())


def document(name: str) -> Path | None:
    if name.startswith("README"):
        return ROOT / "README.md"
    for candidate in (ROOT / name, DOCS / name, DOCS / Path(name).name):
        if candidate.is_file():
            return candidate
    return None


def headings(path: Path) -> set[str]:
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            found.add(" ".join(re.sub(r"[`*_]", "", heading[1]).split()))
    return found


def test_code_cites_sections_that_exist():
    cited = citations()
    assert any(doc.endswith("DESIGN.md") for _, doc, _ in cited)  # the scan finds citations at all
    wrong = []
    for where, doc, section in cited:
        path = document(doc)
        if path is None:
            wrong.append(f'{where}: {doc}, "{section}": no such document')
            continue
        titles = headings(path)
        if section not in titles and not any(t.startswith(section + ":") for t in titles):
            wrong.append(f'{where}: {doc}, "{section}": no such heading in {path.relative_to(ROOT)}')
    assert not wrong, "\n".join(wrong)
