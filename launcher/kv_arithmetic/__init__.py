"""The CALM paper's key-value arithmetic experiment (Table 1), whole: the task, pretraining the two base
models, the baselines, the experiment and its report."""
