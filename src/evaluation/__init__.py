"""Off-policy evaluation: the estimators (`estimators`, NumPy only), the logged interactions
they score (`interactions`) and learning from those logs (`offline`).

Nothing is imported here: readers of metric names (src.metrics) import the estimators
without TensorFlow or MLflow, which the other two modules load.
"""
