"""Where results are written: `provenance.write_record`."""

import json

from jdecode.provenance import write_record


def test_write_record_keeps_a_dotted_tag_whole(tmp_path):
    # Two runs whose tags differ only after a dot must land in two pairs of files.
    for tag in ("llama-3.2-1b_A", "llama-3.2-1b_B"):
        js, md = write_record(tmp_path / f"serving_{tag}", {"tag": tag}, f"| {tag} |\n")
        assert js.name == f"serving_{tag}.json" and md.name == f"serving_{tag}.md"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["serving_llama-3.2-1b_A.json", "serving_llama-3.2-1b_A.md",
                     "serving_llama-3.2-1b_B.json", "serving_llama-3.2-1b_B.md"]
    assert json.loads((tmp_path / "serving_llama-3.2-1b_A.json").read_text()) == {
        "tag": "llama-3.2-1b_A"}
    assert (tmp_path / "serving_llama-3.2-1b_B.md").read_text() == "| llama-3.2-1b_B |\n"
