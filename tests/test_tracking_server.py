"""A tracking server that answers but refuses. (The pipeline as a Prefect deployment on a worker, tracking
into an MLflow server on PostgreSQL, is the end-to-end test in tests/test_pipeline.py.)"""

import http.server
import threading

from conftest import grpolab


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_error(503, "maintenance")

    def log_message(self, *args):
        pass


def test_a_tracking_server_that_refuses_fails_the_pipeline_before_any_stage(project):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        before = (project / "params.yaml").read_bytes()
        proc = grpolab("run", "-S", f"tracking.uri={uri}", cwd=project, check=False)
    finally:
        server.shutdown()
    assert proc.returncode == 2
    assert f"grpolab: error: tracking.uri: the MLflow tracking store {uri} is unavailable" in proc.stderr
    assert "503" in proc.stderr and "==> stage" not in proc.stdout + proc.stderr
    assert (project / "params.yaml").read_bytes() == before and not (project / "data").exists()
