"""Evaluation: `metrics` scores one plan (accuracy, perplexity, embedding agreement), `tasks`
binds a model to a dataset and its metric, `sweep` runs plans over CRs into rows, `report`
turns rows into JSON, Markdown and plots, `timing` times calls for the benchmarks."""
