"""bench/gpu_check.py with tiny shapes on CPU, so the script a GPU machine runs cannot rot: every section runs,
the collectives go through, step 1's KL is 0 under gradient checkpointing, and every figure is in the JSON."""

import json
import subprocess
import sys

from conftest import REPO, project_env


def test_the_gpu_check_runs_every_section_on_tiny_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--tiny", "--out", str(out)], cwd=tmp_path,
                          env=project_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True and "every section ran" in proc.stdout
    a = report["a_versions_and_collectives"]
    assert a["collectives_ok"] and a["backend"] == "cpu:gloo" and a["device"] == "cpu"
    b = report["b_steps_with_gradient_checkpointing"]
    assert [s["step"] for s in b["steps"]] == [1, 2, 3] and b["step1_kl_is_0"] and b["buffers_match"]
    c = report["c_rollouts"]
    assert set(c) >= {"4_rows", "8_rows"} and all(c[k]["sample_tokens_per_s"] > 0 and c[k]["ratio_median"] > 0 for k in ("4_rows", "8_rows"))
    d = report["d_updates"]
    assert all(d[f"micro_batch_{m}"]["tokens_per_s"] > 0 and "mfu" in d[f"micro_batch_{m}"] for m in (2, 4))
    e = report["e_tracin_same_batch"]
    assert e["chunk_tokens"] == 4 * 16 and 0 < e["selected_ratio"] <= 1
