"""`jdecode roofline` through typer's CliRunner, JSON output, and the PNG plots."""

import json
import re

import typer
from typer.testing import CliRunner

from jdecode.analysis.cli import roofline
from jdecode.analysis.costs import decode_phase, prefill_phase
from jdecode.analysis.hardware import get_hardware
from jdecode.analysis.plots import plot_roofline, plot_tokens_vs_batch
from jdecode.analysis.roofline import analyze, decode_tokens_per_s_vs_batch
from jdecode.analysis.textbook import TEXTBOOK_CONFIG

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("roofline")(roofline)

    @app.command("other")
    def other() -> None:  # a second command keeps "roofline" a subcommand, as in jdecode
        pass

    return app


def invoke(*args):
    result = CliRunner().invoke(_app(), ["roofline", *args], env={"COLUMNS": "200"})
    return result


def test_textbook_preset_prints_the_seed_numbers(tmp_path):
    out = tmp_path / "tb.json"
    result = invoke("--preset", "textbook", "--json", str(out))
    assert result.exit_code == 0, result.output
    text = result.output
    for number in ("2730.7", "114.7", "8.0", "142.5", "153.0", "688.0"):
        assert number in text, number
    assert re.search(r"attention \(③, unfused\)\s*│\s*114\.7\s*│\s*memory", text)
    assert re.search(r"decode\s*│\s*linear \(①⑤⑦⑨\)\s*│\s*8\.0\s*│\s*memory", text)
    assert "mildly memory-bound even in prefill" in text
    data = json.loads(out.read_text())
    assert round(data["summary"]["prefill"]["attention"]["intensity"], 1) == 114.7
    assert round(data["summary"]["ridge_gib"], 1) == 142.5
    assert data["git_sha"]


def test_model_phase_json_and_plots(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "roof.png"
    result = invoke("--model", "tiny", "--phase", "decode", "--batch", "4", "--seq", "64",
                    "--hardware", "l4", "--convention", "textbook", "--json", str(out),
                    "--plot", str(png))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    (rep,) = data["reports"]
    assert rep["phase"] == {"name": "decode", "batch": 4, "q_len": 1, "kv_len": 64,
                            "head_tokens": 1}
    assert rep["hardware"]["name"] == "l4" and rep["convention"] == "textbook"
    assert data["config"]["hidden_size"] == 64 and data["jax_version"]
    for path in (png, tmp_path / "roof_batch.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000


def test_bad_options_name_the_fix():
    result = invoke("--model", "no-such-model")
    assert result.exit_code != 0
    assert "known names" in result.output and "tiny" in result.output
    result = invoke("--model", "tiny", "--phase", "middle")
    assert result.exit_code != 0 and "prefill, decode, both" in result.output


def test_set_override_changes_the_config(tmp_path):
    out = tmp_path / "r.json"
    result = invoke("--model", "tiny", "--set", "num_layers=3", "--phase", "prefill",
                    "--json", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["config"]["num_layers"] == 3


def test_plot_functions_write_pngs(tmp_path):
    hw = get_hardware("a100")
    reps = [analyze(TEXTBOOK_CONFIG, p, hw) for p in (prefill_phase(8, 1024),
                                                      decode_phase(8, 1024))]
    path = plot_roofline(reps, tmp_path / "a" / "roof.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    curve = decode_tokens_per_s_vs_batch(TEXTBOOK_CONFIG, hw, 512, [1, 16, 256])
    path = plot_tokens_vs_batch(curve, tmp_path / "batch.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_roofline_labels_do_not_overlap_and_stay_inside():
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from jdecode.analysis.plots import roofline_figure
    from jdecode.analysis.textbook import textbook_reports

    fig = roofline_figure(list(textbook_reports()))
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = []
    for t in ax.texts:
        t.update_positions(renderer)
        boxes.append((t.get_text(), Text.get_window_extent(t, renderer)))
    plt.close(fig)
    labels = [(s, b) for s, b in boxes if "proj" in s or "attention" in s or "lm_head" in s]
    assert len(labels) >= 6
    for i, (s, b) in enumerate(boxes):
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1, s
        for s2, b2 in boxes[i + 1:]:
            assert not b.overlaps(b2), (s, s2)
