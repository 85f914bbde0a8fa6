"""The command line: start-up without torch / MONAI, one-line errors, catalog listing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from medpipe.cli import app


def test_ingest_does_not_import_torch_or_monai(tmp_path: Path, shared_data: Path) -> None:
    code = (
        "import sys\n"
        "from medpipe.cli import main\n"
        "try:\n"
        f"    main(['ingest', {str(shared_data / 'dcm_qa_enh' / 'In')!r}, '--out', {str(tmp_path)!r}, '-q'])\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'monai', 'highdicom') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "manifest.csv").is_file()


def test_catalog_lists_series(tmp_path: Path, shared_data: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(shared_data / "dcm_qa_enh" / "In"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "written" in result.output
    result = runner.invoke(app, ["catalog", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "B0 NS" in result.output and "REST1" in result.output
    assert "3 volumes" in result.output.replace("\n", " ")


def test_catalog_of_a_folder_without_one_is_a_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["catalog", str(tmp_path)])
    assert result.exit_code == 2
    assert "no catalog.sqlite" in result.output
    assert result.output.count("\n") <= 2


def test_a_failing_stage_is_reported_once_on_the_console_and_kept_in_run_log(tmp_path: Path) -> None:
    """The runner logs a stage's failure to run.log; the console shows it once, as the command's ``error:`` line
    (it used to print an ``ERROR medpipe: ... failed`` log line first: two lines for one problem)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "p.yaml").write_text("name: fails\nstages:\n  - stage: ingest\n    source: empty\n    out: ing\n")
    out = subprocess.run([sys.executable, "-m", "medpipe.cli", "run", "p.yaml", "--out", "run"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    problem = "empty: no files found"
    assert out.stderr.count(problem) == 1, out.stderr
    assert "error: stages[0] (ingest):" in out.stderr and "ERROR medpipe" not in out.stderr
    assert "00_ingest failed:" in (tmp_path / "run" / "run.log").read_text()
