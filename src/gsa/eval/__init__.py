"""Evaluation: perplexity, MQAR recall, lm-evaluation-harness tasks, and a synthetic recall suite.

Modules (each importable on its own; `gsa eval <name>` drives them):
    loading      a causal LM on a device, and its tokenizer (tokenizers and corpora are gsa.data's)
    scoring      batched log-likelihoods of continuations, greedy decoding from the model's cache
    perplexity   perplexity and bits per byte over documents, in (strided) windows
    mqar         the MQAR task generator (Zoology); mqar_sweep: training, sweeps, tables and plots
    harness      the lm-eval model type "gsa" and a runner; offline_tasks + tasks/: offline task data and YAMLs
    recall       phonebook look-up and needle-in-a-haystack at growing lengths
"""
