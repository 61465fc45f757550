"""`grpolab ui`: the MLflow UI, opened where a researcher compares training runs.

MLflow 3.17's UI opens every experiment on its GenAI overview (its default "workflow type", kept per
browser), and its runs table shows no metric or param column until someone picks them. No server or
experiment setting changes either, so `grpolab ui` serves MLflow through this app plugin (entry point
`mlflow.app: grpolab`, i.e. `mlflow server --app-name grpolab`), which adds one small script to the
UI's page: a browser that has not chosen a workflow type gets "model training", and an experiment
opened by its plain link (`#/experiments/<id>`, what the experiments list links to) lands on the runs
table with grpolab's columns (the shared view `tracking.RUNS_VIEW` that grpolab sets on every
experiment it logs to). A person's own later choices win.

Served beyond this machine (docker/compose.yaml), the same UI sits behind MLflow's basic authentication:
`--app-name grpolab-auth` is MLflow's own `basic-auth` app (`mlflow.server.auth`) with the script added,
its admin user and password from MLflow's MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, and the
password rotated by changing that variable and restarting (MLflow itself reads it only to create the user).
"""

from __future__ import annotations

from grpolab.tracking import RUNS_VIEW

SCRIPT = """<script>
(function () {
  var KEY = "mlflow.workflowType_v1";
  try { if (!localStorage.getItem(KEY)) localStorage.setItem(KEY, JSON.stringify("machine_learning")); } catch (e) {}
  function route() {
    var m = location.hash.match(/^#\\/experiments\\/([^\\/?]+)\\/?$/);
    if (!m) return;
    var runs = "#/experiments/" + m[1] + "/runs?workflowType=machine_learning";
    location.replace(runs);
    fetch("ajax-api/2.0/mlflow/experiments/get?experiment_id=" + encodeURIComponent(m[1]))
      .then(function (r) { return r.json(); })
      .then(function (body) {
        var tags = (body.experiment && body.experiment.tags) || [];
        var own = tags.some(function (t) { return t.key === "mlflow.sharedViewState.VIEW"; });
        if (own && location.hash === runs) location.replace(runs + "&viewStateShareKey=VIEW");
      })
      .catch(function () {});
  }
  route();
  window.addEventListener("hashchange", route);
})();
</script>""".replace("VIEW", RUNS_VIEW)


def _inject(response):
    """Add the script to the UI's page (index.html), nothing else."""
    if response.mimetype != "text/html" or response.status_code != 200:
        return response
    response.direct_passthrough = False
    page = response.get_data(as_text=True)
    if "</head>" in page and SCRIPT not in page:
        response.set_data(page.replace("</head>", SCRIPT + "</head>", 1))
    return response


def create_app():
    """The `mlflow.app` entry point: MLflow's own server app with the script added to its page."""
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app

    app.after_request(_inject)
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app


AUTH_DATABASE_ENV = "GRPOLAB_MLFLOW_AUTH_DATABASE_URI"  # where MLflow's auth app keeps its users (else its ini's)
# MLflow checks a basic-auth password by its scrypt hash on every request (0.11 s of CPU each here), and a training
# logs on every step: a credential checked once is trusted for this long (MLflow's own cache; a password changed
# through the API is dropped from it at once, on the worker that changed it).
AUTH_CACHE_TTL_SECONDS = 60


def create_auth_app():
    """The `mlflow.app` entry point `grpolab-auth`: MLflow's basic-auth app, with the script added, whose admin
    user's password is the one configured now (MLFLOW_AUTH_ADMIN_PASSWORD): a restart with a new one rotates it."""
    import os

    if not os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):  # a file of the user's own is theirs as it is
        os.environ["MLFLOW_AUTH_CONFIG_PATH"] = _auth_config_file(os.environ.get(AUTH_DATABASE_ENV))
    from mlflow.server import app
    from mlflow.server import auth  # reads its configuration on import

    app.after_request(_inject)
    served = auth.create_app(app)
    _rotate_admin_password(auth)
    return served


def _auth_config_file(database_uri: str | None) -> str:
    """MLflow's auth settings (basic_auth.ini, the shipped defaults) with the credential cache on and the users'
    database set where given: MLflow reads both from this file only. Private to this process's user: the URI may
    hold the database's password."""
    import configparser
    import importlib.util
    import os
    import tempfile
    from pathlib import Path

    package = importlib.util.find_spec("mlflow.server.auth")  # not imported: it reads the file on import
    parser = configparser.ConfigParser()
    parser.read(Path(package.origin).with_name("basic_auth.ini"))
    if database_uri:
        parser["mlflow"]["database_uri"] = database_uri
    parser["mlflow"]["auth_cache_ttl_seconds"] = str(AUTH_CACHE_TTL_SECONDS)
    fd, path = tempfile.mkstemp(prefix="grpolab-mlflow-auth-", suffix=".ini")  # mode 0600
    with os.fdopen(fd, "w") as f:
        parser.write(f)
    return path


def _rotate_admin_password(auth) -> None:
    username, password = auth.auth_config.admin_username, auth.auth_config.admin_password
    if password and not auth.store.authenticate_user(username, password, use_primary=True):
        auth.store.update_user(username, password=password)
        import logging

        logging.getLogger(__name__).warning("the password of MLflow admin user %r was set from MLFLOW_AUTH_ADMIN_PASSWORD", username)


def ui_command(params, port: int) -> tuple[list[str], str]:
    """The command that serves the MLflow UI of the project's store on 127.0.0.1, and its address."""
    import sys

    from grpolab.tracking import tracking_uri

    uri = tracking_uri(params)
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "grpolab", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return cmd, f"http://127.0.0.1:{port}"
