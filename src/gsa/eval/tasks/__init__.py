"""lm-eval task YAMLs for offline evaluation (load with `TaskManager(include_path=<this folder>)`), and the
`custom_dataset` hooks they name; their data is built on first use by `gsa.eval.offline_tasks`."""
