"""notebooks/join.ipynb run headless in a Jupyter kernel against a live coordinator, as a volunteer runs it."""

import json
import os
import signal
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "join.ipynb"
KERNEL_SESSION = "import os\nprint(os.getsid(0))"
SUMMARY_JSON = "import json\nprint(json.dumps(summary.as_dict()))"


def prepared(**parameters) -> NotebookNode:
    """The notebook with a cell setting `parameters` after its `parameters` cell, as papermill injects
    them; a first cell printing the kernel's session id and a last one printing the peer's summary as JSON."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook.cells.insert(index + 1, new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    notebook.cells.insert(0, new_code_cell(KERNEL_SESSION))
    notebook.cells.append(new_code_cell(SUMMARY_JSON))
    return notebook


def text_output(cell: NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


def execute(notebook: NotebookNode, saved_as: Path, **client_options) -> NotebookNode:
    """Run every cell but those tagged skip-execution (the install cell), from the notebook's folder.
    The executed notebook, outputs and all, is saved for a look afterwards, and whatever is left of
    the kernel's session (hivemind's helper processes) is killed."""
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        startup_timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
        **client_options,
    )
    try:
        return client.execute()
    finally:
        nbformat.write(notebook, saved_as)
        session = text_output(notebook.cells[0]).strip()
        if session and int(session) != os.getsid(0):  # Jupyter starts kernels in a session of their own
            try:
                os.killpg(int(session), signal.SIGKILL)
            except ProcessLookupError:
                pass


def summary_of(executed: NotebookNode) -> dict:
    return json.loads(text_output(executed.cells[-1]))


def notebook_samples(state: dict) -> int:
    return next((peer["samples"] for peer in state["peers"] if peer["name"] == "notebook"), 0)


@pytest.fixture(autouse=True)
def one_compute_thread(monkeypatch):
    """The kernel inherits this: the notebook's peer shares this machine's cores with the others."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_notebook_is_committed_clean():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    tags = [cell.metadata.get("tags", []) for cell in code]
    assert "skip-execution" in tags[0] and "%pip install" in code[0].source
    assert sum("parameters" in cell_tags for cell_tags in tags) == 1


def test_notebook_joins_a_live_run(tmp_path, write_run_config, coordinator, launch_peer):
    coord = coordinator(write_run_config(tmp_path, target_batch_size=32))
    launch_peer("worker", initial_peers=[coord.address], duration=300)
    coord.wait_for(lambda s: s["epoch"] >= 1, 120, "the run to be under way")

    executed = execute(
        prepared(INITIAL_PEERS=[coord.address], NAME="notebook", DURATION=30, BATCH_SIZE=4),
        tmp_path / "join.ipynb",
        timeout=300,
    )

    summary = summary_of(executed)
    # It joined a run in progress: it downloaded the model, then averaged its gradients with the worker.
    assert summary["state_loads"] >= 1 and summary["rounds_succeeded"] >= 1, summary
    assert summary["samples_contributed"] > 0
    printed = text_output(executed.cells[-2])  # the notebook's own summary cell
    assert "samples contributed" in printed and f"{summary['samples_contributed']:,}" in printed
    coord.wait_for(lambda s: notebook_samples(s) > 0, 30, "the notebook's samples on the coordinator")


def test_interrupting_the_kernel_stops_the_peer_cleanly(tmp_path, write_run_config, coordinator):
    coord = coordinator(write_run_config(tmp_path, target_batch_size=32))
    duration = 60
    # The kernel is interrupted 30 s into the training cell, as the notebook's stop button does.
    executed = execute(
        prepared(INITIAL_PEERS=[coord.address], NAME="notebook", DURATION=duration, BATCH_SIZE=4),
        tmp_path / "join.ipynb",
        timeout_func=lambda cell: 30 if ".run(" in cell.source else 300,
        interrupt_on_timeout=True,
    )

    summary = summary_of(executed)
    assert summary["samples_contributed"] > 0
    assert summary["seconds"] < duration - 15, "the peer trained on after the interrupt"
    coord.wait_for(lambda s: notebook_samples(s) > 0, 30, "the notebook's samples on the coordinator")
