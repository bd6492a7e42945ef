"""Project-level promises: light scoring imports, reproducible fixtures."""

import subprocess
import sys

from tests.conftest import CATALOG, HOLDOUT, ROOT


def test_scoring_layer_never_imports_training():
    code = ("import sys, anime_udf, anime_udf.cli, anime_udf.udf; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'training'], 'training imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


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
