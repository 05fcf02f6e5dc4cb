"""Campaigns: Optuna studies whose trials are tracked training runs, run by any number of workers.

The study's storage (SQLite on one machine, PostgreSQL across machines) is the shared work
queue; Optuna keeps it consistent. MLflow gets a parent run per study, holding the best
value and parameters, the best trial's run id and Optuna's plots, with one child run per
trial tagged with the study name and trial number.

Each module imports only those listed before it (`tuned` stands apart):

- `trials`: what links a trial to its runs (trial states, the attributes that hold its run,
  its parent run and its error), and the hook by which Hydra's own Optuna sweeper hands a job
  its trial.
- `repair`: a trial whose worker dies (SIGKILL, a lost machine) is failed by a living
  worker, its MLflow run marked FAILED, and the trial run again; runs left RUNNING by a lost
  tracking server are failed when the study resumes.
- `storage`: the study's database, waited out when it restarts (`sweep.storage_patience_s`),
  and every way of not reaching it said in one line.
- `study`: `prepare` makes (or resumes) the study and its parent run, and refuses an
  unreachable storage or a study of the same name with another direction. A grid study
  (Optuna's `GridSampler` in the sweep config) gets every grid point enqueued once.
- `selection`: in a study with objective `ope/<estimator>`, how well the estimate ranks the
  trials by their true values (Spearman) and the true value the chosen trial gives up.
- `summary`: `summarise` writes the outcome into the parent run and registers the best
  trial's model, once the last trial has ended, whichever worker ends it.
- `worker`: `work` runs trials until the study holds `n_trials` COMPLETE ones. Trials in
  progress on other workers count, so however many workers join, the study ends with exactly
  that many. With `sweep.pruner` set, hopeless trials stop early: PRUNED in Optuna, KILLED
  and tagged `sweep.pruned` in MLflow. TensorFlow loads here, when the first trial runs.
- `tuned`: the configurations conf/tuned/ holds, each a study's best trial
  (benchmarks/tune.py runs the studies).
"""
