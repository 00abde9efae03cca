"""`custom_dataset` hooks of the YAMLs beside this file. lm-eval calls them with the task's metadata, where
`data_dir` (set by `gsa eval harness --data-dir`) says where the built JSON lines live."""

from gsa.eval.offline_tasks import load_task_dataset


def shakespeare_ppl(**metadata):
    return load_task_dataset("gsa_shakespeare_ppl", metadata.get("data_dir"))


def shakespeare_cloze(**metadata):
    return load_task_dataset("gsa_shakespeare_cloze", metadata.get("data_dir"))


def shakespeare_next_line(**metadata):
    return load_task_dataset("gsa_shakespeare_next_line", metadata.get("data_dir"))
