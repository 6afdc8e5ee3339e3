"""Every command line in the ```bash blocks of README.md and of the docs site's pages (docs/*.md)
is run somewhere, or says why it cannot be.

RUN_BY maps a documented command to what runs it: a test (`tests/<file>.py::<test>`, which must
exist and take its commands from the docs (tests/runbook.py's `readme_commands`) or spell them,
unless `— <note>` says how it runs the same thing) or a CI script (`.ci/run`,
`.github/workflows/<file>.yml`, which must contain the command). NOT_RUNNABLE maps a command to
the reason it cannot run on a test machine (a cloud account, a Docker engine, the real dataset).
A documented command in neither fails `test_every_readme_command_is_run_or_excused`, so a new
command cannot drift from the product unnoticed; a new docs page is covered as soon as it exists.

Commands are compared as written, with `\\` continuations joined, a trailing `# comment` cut
and runs of spaces made one.
"""

# ruff: noqa: E501  (the registry spells README commands on one line each, as the README does)
from __future__ import annotations

import re
from pathlib import Path

from runbook import blocks, doc_commands, normalise, readme_commands

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


E2E = "tests/e2e/test_readme_path.py"

RUN_BY: dict[str, str] = {
    # Quick start, in a temporary copy of the project (make run builds it; make serve serves it)
    "make run": f"{E2E}::test_make_run_reproduces_and_prints_the_decision",
    "make test": ".ci/run",
    "make serve": f"{E2E}::test_quick_start_serve_samples_curl_and_mlflow_ui",
    ".venv/bin/python -m chestct.cli.samples": f"{E2E}::test_quick_start_serve_samples_curl_and_mlflow_ui",
    "curl -F file=@slice.png http://127.0.0.1:8000/predict": f"{E2E}::test_quick_start_serve_samples_curl_and_mlflow_ui",
    ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db": f"{E2E}::test_quick_start_serve_samples_curl_and_mlflow_ui",
    # Dry runs, single stages and resuming; Troubleshooting
    "make plan": f"{E2E}::test_make_plan_names_the_downstream_stages_and_runs_nothing",
    "dvc status": f"{E2E}::test_make_plan_names_the_downstream_stages_and_runs_nothing",
    "dvc repro --dry": f"{E2E}::test_make_plan_names_the_downstream_stages_and_runs_nothing",
    "make repro": f"{E2E}::test_a_params_typo_through_make_repro_leaves_artifacts_intact",
    "dvc checkout train && git checkout -- reports/train": f"{E2E}::test_dvc_repro_after_a_typo_loses_train_and_dvc_checkout_restores",
    "dvc metrics diff HEAD~1": f"{E2E}::test_metrics_and_plots_compare_commits_without_a_cache",
    "dvc plots diff HEAD~1": f"{E2E}::test_metrics_and_plots_compare_commits_without_a_cache",
    "dvc repro train": f"{E2E}::test_dry_run_block_on_an_up_to_date_pipeline",
    "dvc repro -s train": f"{E2E}::test_dry_run_block_on_an_up_to_date_pipeline",
    "dvc repro --downstream train": f"{E2E}::test_dry_run_block_on_an_up_to_date_pipeline",
    "dvc repro --keep-going": f"{E2E}::test_dry_run_block_on_an_up_to_date_pipeline",
    "dvc metrics show": f"{E2E}::test_dry_run_block_on_an_up_to_date_pipeline",
    "dvc plots show": f"{E2E}::test_dry_run_block_on_an_up_to_date_pipeline",
    "dvc repro": f"{E2E}::test_dry_run_block_on_an_up_to_date_pipeline",
    "dvc repro -f -s ingest": f"{E2E}::test_forced_ingest_reruns_ingest_alone",
    # Experiments and the way back
    "dvc exp run -S train.learning_rate=0.0003": f"{E2E}::test_an_experiment_and_the_way_back",
    "dvc exp show --drop '.*' --keep '^(Experiment|Created|robust_macro_f1|macro_f1|balanced_accuracy|roc_auc|ece_calibrated|train\\.learning_rate)$'": f"{E2E}::test_an_experiment_and_the_way_back",
    "dvc exp apply <name>": f"{E2E}::test_an_experiment_and_the_way_back",
    "dvc exp show": f"{E2E}::test_an_experiment_and_the_way_back",
    "python -m chestct.cli.restore": f"{E2E}::test_an_experiment_and_the_way_back",
    # Serving: the curl lines run verbatim against real gunicorn
    "curl -s http://127.0.0.1:8000/health": "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    "curl -s http://127.0.0.1:8000/ready": "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    "curl -s http://127.0.0.1:8000/metadata": "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    "curl -s -F file=@slice.png http://127.0.0.1:8000/predict": "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    'curl -s -H "Content-Type: image/png" --data-binary @slice.png http://127.0.0.1:8000/predict': "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    'curl -s -H "Content-Type: application/dicom" --data-binary @slice.dcm http://127.0.0.1:8000/predict': "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    'curl -s -H "Content-Type: application/json" -d "{\\"image\\": \\"$(base64 -w0 slice.png)\\"}" http://127.0.0.1:8000/predict': "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    "curl -s -F files=@slice.png -F files=@slice.dcm http://127.0.0.1:8000/predict/batch": "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    "curl -s -F file=@slice.png -o heatmap.png http://127.0.0.1:8000/explain": "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    'curl -s -F file=@slice.png "http://127.0.0.1:8000/explain?format=json&class=normal"': "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    "curl -s http://127.0.0.1:8000/metrics": "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    'curl -s -H "Authorization: Bearer $CHESTCT_HISTORY_TOKEN" "http://127.0.0.1:8000/history?limit=5"': "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    'curl -s -H "Authorization: Bearer $CHESTCT_FEEDBACK_TOKEN" -H "Content-Type: application/json" -d "{\\"id\\": \\"$(curl -s -F file=@slice.png http://127.0.0.1:8000/predict | python3 -c \'import json, sys; print(json.load(sys.stdin)["id"])\')\\", \\"label\\": \\"normal\\"}" http://127.0.0.1:8000/feedback': "tests/serving/test_gunicorn.py::test_readme_curl_examples_against_gunicorn",
    # Monitoring: the same CLI, with --db/--model-dir/--out naming the test's files
    ".venv/bin/python -m chestct.monitoring.monitor": "tests/serving/test_monitoring.py::test_in_distribution_slices_show_no_drift — run_monitor_cli, with the test's --db/--model-dir/--out",
    ".venv/bin/python -m chestct.monitoring.monitor --last 1000": "tests/serving/test_monitoring.py::test_in_distribution_slices_show_no_drift — run_monitor_cli with --last over the test's window",
    ".venv/bin/python -m chestct.monitoring.monitor --since 24h": "tests/serving/test_monitoring.py::test_monitor_errors_name_the_fix — run_monitor_cli with --since 1h",
    ".venv/bin/python -m chestct.monitoring.monitor --db audit/predictions.sqlite --model-dir model --out monitoring": "tests/serving/test_monitoring.py::test_in_distribution_slices_show_no_drift — run_monitor_cli passes --db, --model-dir and --out",
    # Research notebooks: executed by nbclient, the library `jupyter execute` runs
    ".venv/bin/jupyter execute research/01-eda.ipynb": "tests/e2e/test_notebooks.py::test_eda_notebook_runs_on_the_embedded_default_and_on_a_data_path — through nbclient, which `jupyter execute` runs",
    ".venv/bin/jupyter execute --output=/tmp/errors.ipynb research/02-error-analysis.ipynb": "tests/e2e/test_notebooks.py::test_error_analysis_notebook_runs_on_the_promoted_model — through nbclient, which `jupyter execute` runs",
    # Development
    "make lint": ".ci/run",
    "make docs": "tests/unit/test_docs_site.py::test_the_docs_site_builds_strictly_and_loads_nothing_from_elsewhere — runs the `mkdocs build --strict` that `make docs` runs",
    # The real-data preset: the same preset and --set arguments through presets.main
    "python -m chestct.cli.presets config/presets/real-data.yaml --set ingest.source=/path/to/chest-ct/train --set evaluate.external=/path/to/chest-ct/valid": "tests/unit/test_presets.py::test_the_real_data_preset_merges_with_its_two_paths — presets.main with the same preset and two --set paths",
    # Scaling out, outside the runbook blocks
    "make tracking-server": "tests/e2e/test_tracking_server.py::test_make_tracking_server_binds_to_localhost_with_sql_and_proxied_artifacts — server_command() reads the command `make tracking-server` runs",
    "make tracking-server TRACKING_BACKEND=postgresql+psycopg2://mlflow:secret@127.0.0.1:5432/mlflow": "tests/e2e/test_tracking_server.py::test_postgres_backend_holds_runs_and_the_registry — the same make variables on a throw-away PostgreSQL cluster",
    "sudo -u postgres createuser --pwprompt mlflow": "tests/e2e/test_tracking_server.py::test_postgres_backend_holds_runs_and_the_registry — createuser/createdb on its own initdb cluster, without the password prompt",
    "sudo -u postgres createdb --owner mlflow mlflow": "tests/e2e/test_tracking_server.py::test_postgres_backend_holds_runs_and_the_registry — createuser/createdb on its own initdb cluster",
}

# A README or docs block after `<!-- runbook: NAME -->` runs verbatim in these tests (tests/runbook.py),
# so each of its command lines counts as run.
RUNBOOK_BY: dict[str, str] = {
    "remote-push": "tests/e2e/test_remote.py::test_push_put_the_cache_in_the_bucket",
    "remote-pull": "tests/e2e/test_remote.py::test_the_pulled_clone_is_up_to_date_and_reruns_nothing",
    "tracking-run": "tests/e2e/test_tracking_server.py::test_stages_log_runs_metrics_and_proxied_artifacts_to_the_server",
    "tracking-compare": "tests/e2e/test_tracking_server.py::test_compare_reads_the_server",
    "multi-worker-chief": "tests/e2e/test_multi_worker.py::test_both_workers_train_in_one_cluster",
    "multi-worker-worker": "tests/e2e/test_multi_worker.py::test_both_workers_train_in_one_cluster",
}

NO_DOCKER = (
    "no Docker engine on the machines chestct is tested on; the CI job `images` "
    "(.github/workflows/ci.yml) builds both targets and probes /ready and /predict"
)
NO_GCS = "needs a Google Cloud account and bucket (only the S3 remote is exercised, against moto)"
NO_AZURE = "needs an Azure storage account (only the S3 remote is exercised, against moto)"
NO_SSH = "needs an SSH storage host (only the S3 remote is exercised, against moto)"
NO_MACHINES = (
    "names other machines; tests/e2e/test_multi_worker.py builds the same TF_CONFIG for two "
    "processes on 127.0.0.1"
)
NO_K8S = (
    "needs a Kubernetes cluster; tests/serving/test_deploy.py validates every manifest against the "
    "Kubernetes schemas and runs the Deployment's command, environment and probes on gunicorn"
)
NOT_RUNNABLE: dict[str, str] = {
    "python bench/data_checks.py /path/to/chest-ct": "needs the real dataset, which no test may use (docs/data-checks.md reports its run)",
    "python -m chestct.cli.presets config/presets/real-data.yaml --set ingest.source=/path/to/chest-ct/train --set evaluate.external=/path/to/chest-ct/valid --set train.ensemble=1 --set train.epochs=12 --set train.patience=6": "needs the real dataset (a CNN's lung share measured by hand, docs/data-checks.md)",
    "dvc repro evaluate": "part of the real-data lung-share run above",
    "dvc exp run --queue -S 'train.learning_rate=0.003,0.0003' -S 'base_model.dropout=0.2,0.5' evaluate": "four trainings through DVC's queue: longer than the suite's budget on 2 cores; tried by hand on a scratch copy (README, Experiments)",
    "export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db": "part of the queued grid above",
    "dvc queue start -j 1": "part of the queued grid above",
    "dvc queue status": "part of the queued grid above",
    "dvc exp apply <name> && dvc repro promote": "part of the queued grid above",
    "pip install kaggle": "needs the Python package index (no internet on test machines)",
    "kaggle datasets download -d mohamedhanyyy/chest-ctscan-images -p data/": "needs a Kaggle account and internet",
    "sha256sum data/chest-ctscan-images.zip": "needs the Kaggle download above",
    "CHESTCT_EDA_DATA=/data/chest-ct .venv/bin/jupyter execute --output=/tmp/eda.ipynb research/01-eda.ipynb": "needs the real dataset; tests/e2e/test_notebooks.py runs the same notebook on a generated data folder",
    "docker build -t chestct:serve .": NO_DOCKER,
    "docker run --rm -p 8000:8000 chestct:serve": NO_DOCKER,
    "docker build --target train -t chestct:train .": NO_DOCKER,
    "docker run --rm chestct:train": NO_DOCKER,
    'docker run --rm -v "$PWD":/app --user "$(id -u):$(id -g)" chestct:train': NO_DOCKER,
    "git tag v0.1.0 && git push origin v0.1.0": "publishes a release to GitHub (CD workflow)",
    "docker pull ghcr.io/<owner>/<repo>:0.1.0": "needs a published image on ghcr.io and a Docker engine",
    "dvc push": "needs a DVC remote (an S3 bucket and its credentials)",
    "dvc pull": "needs a DVC remote (an S3 bucket and its credentials)",
    "CHESTCT_DATA=/data/chest-ct .venv/bin/jupyter execute --output=/tmp/shortcut.ipynb research/03-acquisition-shortcut.ipynb": "needs the real dataset; tests/e2e/test_notebooks.py runs the same notebook on synthetic data with and without a planted zoom cue",
    "dvc remote add -d storage gs://my-bucket/chestct": NO_GCS,
    "dvc remote modify --local storage credentialpath /path/to/service-account.json": NO_GCS,
    "dvc remote add -d storage azure://my-container/chestct": NO_AZURE,
    "dvc remote modify --local storage account_name mystorageaccount": NO_AZURE,
    'dvc remote modify --local storage connection_string "$AZURE_STORAGE_CONNECTION_STRING"': NO_AZURE,
    "dvc remote add -d storage ssh://storage.internal/srv/dvc/chestct": NO_SSH,
    'dvc remote modify --local storage user "$USER"': NO_SSH,
    "dvc remote modify --local storage keyfile ~/.ssh/id_ed25519": NO_SSH,
    "make tracking-server TRACKING_HOST=0.0.0.0 TRACKING_BACKEND=postgresql+psycopg2://mlflow:secret@db.internal:5432/mlflow TRACKING_ARTIFACTS=s3://my-bucket/mlflow-artifacts": "binds every interface and names a database host and a bucket elsewhere; tests bind 127.0.0.1 only (the 127.0.0.1 PostgreSQL form is run)",
    "pip install psycopg2-binary==2.9.13": "installs on the tracking server's machine; requirements-dev.txt pins the same version and `make venv` installs it for the tests",
    """export TF_CONFIG='{"cluster": {"worker": ["trainer-0.internal:12345", "trainer-1.internal:12345"]},""": NO_MACHINES,
    """"task": {"type": "worker", "index": 0}}'""": NO_MACHINES,
    "dvc pull --allow-missing": "needs a DVC remote; tests/e2e/test_remote.py runs dvc pull against moto's S3 server",
    "kubectl apply -f deploy/k8s/training/multi-worker.yaml": NO_K8S,
    "kubectl logs -f job/chestct-train --all-containers": NO_K8S,
    "cd deploy/k8s": NO_K8S,
    "kustomize edit set image chestct-serve=ghcr.io/your-org/chestct:1.0.0": NO_K8S,
    "kubectl apply -k .": NO_K8S,
    "kubectl rollout status deployment/chestct": NO_K8S,
    "locust -f bench/locustfile.py --headless -u 16 -r 4 -t 2m --host http://127.0.0.1:8000 --only-summary --csv /tmp/chestct-locust": "a two-minute load measurement against a server started by hand (docs/benchmarks.md); bench/ measures, tests do not time",
    "docker compose -f deploy/compose/compose.yaml up -d --build": NO_DOCKER
    + "; tests/serving/test_deploy.py parses the compose file",
}

HOW_TO_FIX = """
How to fix: for each command above, either
  - run it in a test (take it from the docs with `readme_commands("<section heading>")`
    from tests/runbook.py, as tests/e2e/test_readme_path.py does) and add
        "<command>": "tests/<file>.py::<test name>",
    to RUN_BY in tests/unit/test_readme_commands.py; or run it in .ci/run or a workflow and name
    that file instead; or
  - if it cannot run on a test machine, add
        "<command>": "<why: needs a cloud account, the real dataset, a Docker engine, ...>",
    to NOT_RUNNABLE there.
The command key is the line as written, without a trailing `# comment`, with single spaces.
"""


def runbook_commands() -> set[str]:
    """Every command line of the runbook blocks (README and docs) that RUNBOOK_BY names."""
    found = set()
    for name, body in blocks().items():
        if name in RUNBOOK_BY:
            found |= {normalise(line) for line in body.replace("\\\n", " ").splitlines()}
    return found - {""}


def test_every_readme_command_is_run_or_excused() -> None:
    covered = RUN_BY.keys() | NOT_RUNNABLE.keys() | runbook_commands()
    missing = [
        f"  {command!r}   ({path.relative_to(REPO)}, under {heading!r})"
        for path, heading, command in doc_commands()
        if command not in covered
    ]
    assert not missing, (
        "Documented command(s) that no test or CI script runs:\n" + "\n".join(missing) + HOW_TO_FIX
    )


def test_the_registry_names_only_commands_the_readme_has() -> None:
    present = {command for _, command in readme_commands()}
    stale = sorted((RUN_BY.keys() | NOT_RUNNABLE.keys()) - present)
    assert not stale, (
        "tests/unit/test_readme_commands.py lists commands README.md and docs/ no longer have; "
        "remove them "
        f"(or fix their spelling): {stale}"
    )
    assert not RUN_BY.keys() & NOT_RUNNABLE.keys()


def test_every_runbook_block_has_its_test() -> None:
    names = set(blocks())
    assert names == RUNBOOK_BY.keys(), (
        f"runbook blocks without a test in RUNBOOK_BY: {sorted(names - RUNBOOK_BY.keys())}; "
        f"RUNBOOK_BY names blocks the docs no longer have: {sorted(RUNBOOK_BY.keys() - names)}"
    )
    for name, runner in RUNBOOK_BY.items():
        path, _, test = runner.partition("::")
        text = (REPO / path).read_text(encoding="utf-8")
        assert f"def {test}(" in text, f"{runner} does not exist"
        assert name in text, f"{path} does not run runbook block {name!r}"


def test_each_runner_exists_and_runs_readme_commands() -> None:
    problems = []
    for command, runner in RUN_BY.items():
        target, _, note = runner.partition(" — ")
        path, _, test = target.partition("::")
        source = REPO / path
        if not source.is_file():
            problems.append(f"{command!r}: {path} does not exist")
            continue
        text = source.read_text(encoding="utf-8")
        if test:
            if f"def {test}(" not in text:
                problems.append(f"{command!r}: {path} has no test {test}")
            elif not note and command not in text and not re.search(r"\breadme_\w+\(", text):
                problems.append(f"{command!r}: {path} neither spells it nor reads the README")
        elif command not in text:
            problems.append(f"{command!r}: {path} does not run it")
    assert not problems, "\n".join(problems)


def test_readme_commands_parses_continuations_and_comments() -> None:
    commands: dict[str, str] = {}
    for heading, command in readme_commands():
        commands.setdefault(command, heading)
    assert commands["make run"] == "## Quick start"
    assert not [c for c in commands if c.endswith("\\")]  # `\` continuations joined
    assert all(" # " not in c for c in commands)
