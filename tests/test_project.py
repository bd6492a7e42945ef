"""Project-level promises and the structural claims of docs/DESIGN.md (several read its diagrams):
light scoring imports, an import graph without cycles, names written once, reproducible fixtures."""

import ast
import re
import subprocess
import sys

from tests.conftest import CATALOG, HOLDOUT, ROOT

DESIGN = (ROOT / "docs" / "DESIGN.md").read_text()


def test_every_test_design_names_exists():
    """A claim of DESIGN.md names the test that checks it: a test file, or a test by its name."""
    defined = {node.name for file in (ROOT / "tests").glob("test_*.py")
               for node in ast.walk(ast.parse(file.read_text())) if isinstance(node, ast.FunctionDef)}
    files = re.findall(r"`(tests/[\w/]+\.py)`", DESIGN)
    names = re.findall(r"`(test_\w+)`", DESIGN)
    assert len(names) > 10 and files
    assert [f for f in files if not (ROOT / f).is_file()] == [] and [n for n in names if n not in defined] == []


def test_scoring_layer_never_imports_training():
    code = ("import sys, anime_udf, anime_udf.cli, anime_udf.udf; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'training'], 'training imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    imports = [f"{file.relative_to(ROOT)}:{node.lineno}" for file in sorted((ROOT / "anime_udf").rglob("*.py"))
               for node in ast.walk(ast.parse(file.read_text()))
               if (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "training")
               or (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "training" for a in node.names))]
    assert imports == []


def test_the_package_and_its_base_floor_import_light():
    """DESIGN.md, "Layers" and "The public API": `import anime_udf` loads none of its modules (PEP 562),
    and the base floor imports neither DuckDB, numpy, polars nor torch."""
    base = sorted(dict(design_floors())["base"])
    code = ("import sys, anime_udf\n"
            "assert not [m for m in sys.modules if m.startswith('anime_udf.')], 'import anime_udf loads a module'\n"
            f"import {', '.join(f'anime_udf.{m}' for m in base)}\n"
            "heavy = [m for m in ('duckdb', 'numpy', 'polars', 'torch', 'pyarrow') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
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


def design_block(heading: str, number: int = 0) -> str:
    """The ``number``-th code block of DESIGN.md's section ``heading``."""
    section = DESIGN.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```")[1 + 2 * number]


def design_floors() -> list[tuple[str, set[str]]]:
    """DESIGN.md, "Layers": the diagram's floors, top floor first, each with its modules (``x.py``
    or a package ``x/``; a path such as ``training/cli.py`` is outside the package)."""
    floors: list[tuple[str, set[str]]] = []
    for line in design_block("Layers").splitlines():
        if match := re.match(r"\s*│ (\w*)(.*?)│", line):  # a floor's first line names it, the next go on
            if match[1]:
                floors.append((match[1], set()))
            floors[-1][1].update(re.findall(r"(?<![\w/])(\w+)(?:\.py|/)(?!\w)", match[2]))
    return floors


def test_the_design_diagram_is_read():
    floors = design_floors()
    assert [name for name, _ in floors] == ["commands", "jobs", "engines", "scoring", "model", "storage", "base"]
    assert {"cli", "cli_common"} == floors[0][1] and "rescore" in floors[1][1]


def test_modules_import_only_from_their_floor_or_below():
    floors = design_floors()
    height = {module: len(floors) - i for i, (_, modules) in enumerate(floors) for module in modules}
    graph = import_graph("anime_udf")
    top_level = {name.split(".")[1] for name in graph if name != "anime_udf"}
    assert top_level == set(height), "a module missing from DESIGN.md's layers (or gone from the package)"
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if a != "anime_udf" and height[b.split(".")[1]] > height[a.split(".")[1]]]
    assert upward == []


def test_the_rescore_engines_sit_on_the_shared_rescore_modules():
    """DESIGN.md, "Rescoring contract": the diagram names every module of anime_udf/rescore/; the
    two engines import the shared modules, and neither those nor the other engine import an engine."""
    diagram = design_block("Rescoring contract")
    named = set(re.findall(r"(\w+)\.py", diagram))
    assert named == {f.stem for f in (ROOT / "anime_udf" / "rescore").glob("*.py")} - {"__init__"}
    engines = {"anime_udf.rescore.on_duckdb", "anime_udf.rescore.on_spark"}
    graph = import_graph("anime_udf")
    assert [f"{a} -> {b}" for a, targets in graph.items() if a.startswith("anime_udf.rescore.")
            for b in targets & engines] == []


def test_both_engines_decide_with_the_same_sections_of_rescore_sql():
    """DESIGN.md, "Rescoring contract": the sections both engines run (each runs a few of its own too)."""
    def sections(module: str, runner: str) -> set[str]:
        tree = ast.parse((ROOT / "anime_udf" / "rescore" / f"{module}.py").read_text())
        return {node.args[1].value for node in ast.walk(tree) if isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name) and node.func.id == runner and len(node.args) == 2
                and isinstance(node.args[1], ast.Constant)}

    shared = sections("on_duckdb", "_run") & sections("on_spark", "run_section")
    assert {"macros", "schema", "checks", "plan", "counts", "apply", "record"} <= shared, shared


def test_every_engine_scores_and_registers_through_udf():
    """DESIGN.md, "Layers": one UDF body (udf.score_batch, udf.interval_batch) and one registration
    loop (udf.register_bundles) serve DuckDB, Spark and dbt."""
    def names(module: str) -> set[str]:
        tree = ast.parse((ROOT / "anime_udf" / f"{module}.py").read_text())
        return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}

    for module in ("udf", "spark"):  # called, not only defined (a definition is no ast.Name)
        assert {"score_batch", "interval_batch", "register_bundles"} <= names(module), module
    assert {"register_bundles", "register_functions"} <= names("dbt")


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

    defined, other = {}, []
    for module in pkgutil.walk_packages(anime_udf.__path__, "anime_udf."):
        if module.name in ("anime_udf.spark", "anime_udf.dbt", "anime_udf.rescore.on_spark"):
            continue
        for name, value in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if value.__module__ != module.name or not issubclass(value, BaseException):
                continue
            if issubclass(value, AnimeUdfError):
                defined[name] = value
            else:
                other.append(name)
    assert defined.keys() <= set(anime_udf.__all__), sorted(defined.keys() - set(anime_udf.__all__))
    assert {name: getattr(anime_udf, name) for name in defined} == defined
    assert anime_udf.AnimeUdfError is AnimeUdfError
    # The rest of the public API (DESIGN.md, "The public API"); and the one exception of the package
    # that is no AnimeUdfError, which never leaves cache.py: an unsafe cache is a warning.
    assert set(anime_udf.__all__) - set(defined) - {"AnimeUdfError"} == {"get_model", "load_scorer", "read_catalog",
                                                                         "register"}
    assert other == ["UnsafeCacheError"]


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


# DESIGN.md, "Layers": the names an outside reader shares, each written in one module. The words are
# also used in these places for something else: the manifest's genre vocabulary (features.genres,
# written and read in features.py, checked in bundle.py and read for the interval scale model), the
# interval scale model's feature names, the report's sections by episodes and studio, the cache's
# listing per encoder; a fine-tuning checkpoint is no bundle and names its own model.safetensors.
OTHER_MEANINGS = {"anime_udf/bundle.py": {"genres": 1}, "anime_udf/features.py": {"genres": 2},
                  "anime_udf/intervals.py": {"episodes": 1, "genres": 2},
                  "anime_udf/report.py": {"episodes": 3, "studio": 2}, "anime_udf/cache.py": {"encoder": 2},
                  "training/fine_tune.py": {"model.safetensors": 2}}


def bundle_file_names() -> tuple[str, ...]:
    """Every file and directory name of a bundle, as bundle.py writes them."""
    from anime_udf import bundle

    return (bundle.MANIFEST, *bundle.HEAD_WEIGHTS.values(), bundle.LEXICAL_VOCABULARY_FILE,
            bundle.LEXICAL_WEIGHTS_FILE, bundle.REFERENCE_FILE, bundle.TRAINING_ROWS_FILE, bundle.CALIBRATION_FILE,
            bundle.ENCODER_DIR, bundle.TOKENIZER_DIR)


def shared_names() -> dict[str, str]:
    """{name: the module that writes it}: column names, bundle files, the models directory's
    files, the SQL functions, the rescore store's schema version."""
    from anime_udf import columns, registry, udf
    from anime_udf.rescore import sql

    names = {name: "anime_udf/columns.py" for name in (*columns.INPUT_COLUMNS, columns.DEFAULT_KEY)}
    names |= {name: "anime_udf/bundle.py" for name in bundle_file_names()}
    names |= {name: "anime_udf/registry.py" for name in (registry.ALIASES_FILE, registry.ALIASES_LOCK)}
    names |= {name: "anime_udf/udf.py" for functions in (udf.FUNCTION_NAMES, udf.EXPLAIN_NAMES, udf.INTERVAL_NAMES)
              for name in functions.values()}
    names[sql.SCHEMA_VERSION] = "sql/rescore.sql"
    return names


def test_shared_names_are_written_once():
    names = shared_names()
    found: dict[str, dict[str, int]] = {}
    for package in ("anime_udf", "training"):
        for file in sorted((ROOT / package).rglob("*.py")):
            where = str(file.relative_to(ROOT))
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Constant) and node.value in names and names[node.value] != where:
                    found.setdefault(where, {}).setdefault(node.value, 0)
                    found[where][node.value] += 1
    assert found == OTHER_MEANINGS
    # The store's schema version: one literal in sql/rescore.sql, read by anime_udf/rescore/sql.py.
    from anime_udf.rescore.sql import SCHEMA_VERSION, UPGRADES

    versions = re.findall(r"'schema_version', '([^']*)'", (ROOT / "sql" / "rescore.sql").read_text())
    assert versions == [SCHEMA_VERSION] and all(int(v) < int(SCHEMA_VERSION) for v in UPGRADES)


def design_bundle_tree() -> tuple[set[str], list[str]]:
    """DESIGN.md, "Bundle format": the file and directory names its tree shows, and the entries
    of manifest.json it lists (a parenthesis says when an entry is there)."""
    tree = design_block("Bundle format").strip().split("\n", 1)[1]  # below the bundle's own name
    entries = re.search(r"manifest\.json(.*?)\n  \S", tree, re.S)[1]
    return (set(re.findall(r"[\w.]+\.(?:safetensors|json)|\w+(?=/)", tree)),
            re.findall(r"\w+", re.sub(r"\([^)]*\)", "", entries)))


def test_the_bundle_tree_names_every_file_of_bundle_py():
    parts = r"[\w.]+\.(?:safetensors|json)|\w+(?=/)"  # a file's name, each directory's
    shown = {part for name in bundle_file_names() for part in re.findall(parts, name + "/")}
    assert design_bundle_tree()[0] == shown


def test_one_meaning_per_name():
    """DESIGN.md, "Layers": the *report* is eval's HTML report, never what a rescore run leaves (its
    run record); ``fit_blend`` is defined once, in training/common.py."""
    said = [f"{file.relative_to(ROOT)}: {word}" for file in sorted((ROOT / "anime_udf" / "rescore").glob("*.py"))
            for word in re.findall(r"\breports?\b", file.read_text())]
    assert said == []
    defined = [str(file.relative_to(ROOT)) for package in ("anime_udf", "training")
               for file in sorted((ROOT / package).rglob("*.py"))
               for node in ast.walk(ast.parse(file.read_text()))
               if isinstance(node, ast.FunctionDef) and node.name == "fit_blend"]
    assert defined == ["training/common.py"]


def test_the_models_directory_is_models_dir_everywhere():
    """DESIGN.md, "SQL functions": a parameter naming the models directory is ``models_dir``."""
    spellings = {arg.arg for file in (ROOT / "anime_udf").rglob("*.py")
                 for node in ast.walk(ast.parse(file.read_text())) if isinstance(node, ast.arguments)
                 for arg in (*node.posonlyargs, *node.args, *node.kwonlyargs)
                 if re.search(r"model.*dir|dir.*model", arg.arg)}
    assert spellings == {"models_dir"}


def test_every_module_says_what_it_holds():
    """DESIGN.md, "Layers": a module's docstring says what it holds (the diagram only places it)."""
    silent = [str(file.relative_to(ROOT)) for package in ("anime_udf", "training")
              for file in sorted((ROOT / package).rglob("*.py")) if not ast.get_docstring(ast.parse(file.read_text()))]
    assert silent == []


def test_every_benchmark_is_named_by_a_docs_page():
    """DESIGN.md, "Outside the package": a page of figures names the script that reproduces them."""
    pages = "".join(page.read_text() for page in (ROOT / "docs").glob("*.md") if page.name != "DESIGN.md")
    assert [script.name for script in sorted((ROOT / "benchmarks").glob("*.py")) if script.name not in pages] == []
