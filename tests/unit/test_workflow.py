"""The nightly workflow (.github/workflows/nightly.yml), parsed and checked for what docs/nightly.md promises:
a self-hosted `kvm` runner, schedule and manual dispatch running `make nightly`, artifacts uploaded whatever
happened, and a pull-request job for lab changes that compares with the last good night and fails on regression.

The shell steps are also run through `bash -n`, so a syntax error cannot hide in a YAML string.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"


@pytest.fixture(scope="module")
def wf() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True
    doc["on"] = doc.pop(True, None) or doc.get("on")
    return doc


def steps(job: dict) -> list[dict]:
    return job["steps"]


def step_using(job: dict, action: str) -> list[dict]:
    return [s for s in steps(job) if s.get("uses", "").split("@")[0] == action]


def run_text(job: dict) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


def test_triggers_schedule_dispatch_and_lab_changes(wf):
    on = wf["on"]
    crons = [entry["cron"] for entry in on["schedule"]]
    assert len(crons) == 1 and len(crons[0].split()) == 5
    assert "workflow_dispatch" in on
    assert on["workflow_dispatch"]["inputs"]["spec"]["default"] == "labs/default.yaml"
    assert sorted(on["pull_request"]["paths"]) == ["lab/render/**", "labs/**"]


def test_jobs_run_on_the_self_hosted_kvm_runner_one_at_a_time(wf):
    for name in ("nightly", "lab-change"):
        labels = wf["jobs"][name]["runs-on"]
        assert "self-hosted" in labels and "kvm" in labels, (name, labels)
        assert wf["jobs"][name]["timeout-minutes"] > 0
    assert wf["concurrency"]["cancel-in-progress"] is False


def test_nightly_job_runs_make_nightly_on_schedule_and_dispatch_only(wf):
    job = wf["jobs"]["nightly"]
    assert "schedule" in job["if"] and "workflow_dispatch" in job["if"] and "pull_request" not in job["if"]
    assert re.search(r"^make nightly LAB=", run_text(job), re.M)
    assert "labs/default.yaml" in job["env"]["LAB"] and "inputs.spec" in job["env"]["LAB"]
    assert "ARTIFACTS" in job["env"]


def test_nightly_uploads_artifacts_always(wf):
    job = wf["jobs"]["nightly"]
    uploads = step_using(job, "actions/upload-artifact")
    assert uploads, "no upload step"
    for step in uploads:
        assert step["if"] == "always()", step
    paths = [s["with"]["path"] for s in uploads]
    assert "${{ env.ARTIFACTS }}" in paths
    baseline = [s for s in uploads if s["with"]["name"] == "conformance-report"]
    assert baseline and baseline[0]["with"]["path"].endswith("/conformance.json")
    # uploads come after the run, and a teardown guard runs always
    names = [s.get("name", s.get("uses")) for s in steps(job)]
    assert names.index("make nightly") < names.index(uploads[0]["name"])
    guard = [s for s in steps(job) if "lab down" in s.get("run", "")]
    assert guard and guard[0]["if"] == "always()"


def test_nightly_writes_the_verdict_to_the_step_summary(wf):
    job = wf["jobs"]["nightly"]
    summary = [s for s in steps(job) if "GITHUB_STEP_SUMMARY" in s.get("run", "")]
    assert summary and summary[0]["if"] == "always()"
    assert "verdict.txt" in summary[0]["run"]


def test_pr_job_only_for_same_repository_pull_requests(wf):
    job = wf["jobs"]["lab-change"]
    assert "github.event_name == 'pull_request'" in job["if"]
    assert "head.repo.full_name == github.repository" in job["if"]
    assert wf["permissions"]["actions"] == "read"
    assert job["env"]["GH_TOKEN"] == "${{ github.token }}"


def test_pr_job_downloads_the_last_successful_nightly_report(wf):
    text = run_text(wf["jobs"]["lab-change"])
    assert "gh run list" in text and "--workflow nightly.yml" in text and "--status success" in text
    assert 'select(.event == "schedule" or .event == "workflow_dispatch")' in text
    assert "gh run download" in text and "--name conformance-report" in text


def test_pr_job_runs_the_changed_spec_compares_and_fails_on_regression(wf):
    job = wf["jobs"]["lab-change"]
    text = run_text(job)
    assert "labs/*.yaml" in text and "lab/render" in text
    assert "make nightly LAB=\"$spec\"" in text
    compare = [s for s in steps(job) if "lab report" in s.get("run", "")]
    assert len(compare) == 1
    body = compare[0]["run"]
    assert re.search(r"\.venv/bin/lab report \"\$OUT/baseline/conformance\.json\" \"\$dir/conformance\.json\"", body)
    assert "GITHUB_STEP_SUMMARY" in body
    assert "exit $status" in body
    # no candidate report (provisioning failed) and a regression both fail the job
    no_report = body.split('if [ ! -f "$dir/conformance.json" ]; then', 1)[1].split("\n            fi", 1)[0]
    assert "status=1; continue" in no_report
    assert re.search(r'if \[ "\$report_rc" -ne 0 \].*; then status=1; fi', body)
    assert "continue-on-error" not in compare[0]
    uploads = step_using(job, "actions/upload-artifact")
    assert uploads and all(s["if"] == "always()" for s in uploads)


def test_every_run_block_is_valid_bash(wf):
    for name, job in wf["jobs"].items():
        for step in steps(job):
            if "run" not in step:
                continue
            script = re.sub(r"\$\{\{[^}]*\}\}", "X", step["run"])  # expressions are substituted before bash
            proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
            assert proc.returncode == 0, f"{name} / {step.get('name')}: {proc.stderr}"


def test_make_nightly_calls_the_script(wf):
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^nightly:.*\n\tbash scripts/nightly\.sh \$\(LAB\)", makefile, re.M)
    assert (ROOT / "scripts" / "nightly.sh").is_file()
