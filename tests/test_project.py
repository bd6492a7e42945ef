"""Project-level promises: light scoring imports, an import graph without cycles, reproducible fixtures."""

import ast
import subprocess
import sys

from tests.conftest import CATALOG, HOLDOUT, ROOT


def test_scoring_layer_never_imports_training():
    code = ("import sys, anime_udf, anime_udf.cli, anime_udf.udf; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'training'], 'training imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def import_graph(package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, counting imports inside functions too (a lazy
    import is still a dependency, and a cycle through one is still a cycle)."""
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (ROOT / package).rglob("*.py")}
    graph = {}
    for module, file in files.items():
        graph[module] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module] |= {name for name in names if name in files and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the path from its smallest module back to it."""
    found = set()

    def walk(path: list[str]) -> None:
        for target in graph[path[-1]]:
            if target == path[0]:
                found.add(tuple(path))
            elif target > path[0] and target not in path:
                walk([*path, target])

    for start in sorted(graph):
        walk([start])
    return sorted(list(c) for c in found)


def test_the_import_graph_has_no_cycles():
    graph = import_graph("anime_udf")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself
    assert cycles(graph) == []
    assert "anime_udf.cli" in graph and graph["anime_udf.scoring"]


# DESIGN.md, "Layers", top floor first: a module imports from its own floor or those below.
FLOORS = [("commands", {"cli", "cli_common"}),
          ("jobs", {"evaluation", "comparison", "report", "rescore", "dbt", "warehouse", "promotion"}),
          ("engines", {"udf", "spark"}),
          ("scoring", {"scoring", "explain"}), ("model", {"models", "text", "lexical", "features", "intervals"}),
          ("storage", {"bundle", "registry", "cache", "catalog"}),
          ("base", {"errors", "columns", "devices", "files", "sqlutil", "metrics"})]


def test_modules_import_only_from_their_floor_or_below():
    height = {module: len(FLOORS) - i for i, (_, modules) in enumerate(FLOORS) for module in modules}
    graph = import_graph("anime_udf")
    top_level = {name.split(".")[1] for name in graph if name != "anime_udf"}
    assert top_level == set(height), "a module missing from DESIGN.md's layers (or gone from the package)"
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if a != "anime_udf" and height[b.split(".")[1]] > height[a.split(".")[1]]]
    assert upward == []


def test_fixture_catalogs_are_what_the_generator_writes(tmp_path):
    sys.path.insert(0, str(ROOT / "fixtures"))
    try:
        import make_catalog
    finally:
        sys.path.pop(0)
    for name, params in make_catalog.FIXTURES.items():
        fresh = make_catalog.write_catalog(tmp_path / name, **params)
        assert fresh.read_text() == (ROOT / "fixtures" / name).read_text()
    assert {CATALOG.name, HOLDOUT.name} == set(make_catalog.FIXTURES)


def test_help_and_listing_import_nothing_heavy(tmp_path):
    code = ("import sys\n"
            "from anime_udf.cli import cli\n"
            "for args in (['--help'], ['train', '--help'], ['models', '--models', sys.argv[1]]):\n"
            "    try:\n"
            "        cli(args)\n"
            "    except SystemExit as exit:\n"
            "        assert exit.code == 0, (args, exit.code)\n"
            "heavy = ('torch', 'transformers', 'sklearn', 'matplotlib', 'duckdb', 'polars', 'pyarrow')\n"
            "heavy = [m for m in heavy if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT, capture_output=True)


def test_every_error_of_the_package_is_exported_under_its_base():
    """What a caller of register, load_scorer, read_catalog or get_model may catch: the base
    AnimeUdfError and each of the package's own errors, from `import anime_udf` (Spark's and
    dbt's errors come with their extras and their modules)."""
    import importlib
    import inspect
    import pkgutil

    import anime_udf
    from anime_udf.errors import AnimeUdfError

    defined = {}
    for module in pkgutil.walk_packages(anime_udf.__path__, "anime_udf."):
        if module.name in ("anime_udf.spark", "anime_udf.dbt", "anime_udf.rescore.on_spark"):
            continue
        for name, value in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(value, AnimeUdfError) and value.__module__ == module.name:
                defined[name] = value
    assert defined.keys() <= set(anime_udf.__all__), sorted(defined.keys() - set(anime_udf.__all__))
    assert {name: getattr(anime_udf, name) for name in defined} == defined
    assert anime_udf.AnimeUdfError is AnimeUdfError


# DESIGN.md, "Style": thin commands over library functions, and functions short enough to read.
CLI_MAX_LINES = 400
FUNCTION_MAX_LINES = 60


def test_the_cli_is_thin_and_no_function_is_long():
    assert len((ROOT / "anime_udf" / "cli.py").read_text().splitlines()) < CLI_MAX_LINES
    long = [f"{file.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for file in sorted((ROOT / "anime_udf").rglob("*.py"))
            for node in ast.walk(ast.parse(file.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > FUNCTION_MAX_LINES]
    assert long == []


# DESIGN.md: the column names live in columns.py. The words are used in these places for
# something else: the manifest's genre vocabulary (features.genres), the interval scale model's
# feature names, the report's sections by episodes and studio.
OTHER_MEANINGS = {"anime_udf/bundle.py": 1, "anime_udf/features.py": 2, "anime_udf/intervals.py": 3,
                  "anime_udf/report.py": 5}


def test_the_input_column_names_are_written_once():
    from anime_udf.columns import INPUT_COLUMNS

    found: dict[str, int] = {}
    for package in ("anime_udf", "training"):
        for file in sorted((ROOT / package).rglob("*.py")):
            if file.name != "columns.py":
                literals = [node for node in ast.walk(ast.parse(file.read_text()))
                            if isinstance(node, ast.Constant) and node.value in INPUT_COLUMNS]
                if literals:
                    found[str(file.relative_to(ROOT))] = len(literals)
    assert found == OTHER_MEANINGS
