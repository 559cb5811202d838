"""Model analysis: parameter and MAC counts (:mod:`.complexity`, ``tools/analysis/get_flops.py``);
loss and metric curves of training runs (:mod:`.log_curves`, ``tools/analysis/plot_logs.py``)."""
