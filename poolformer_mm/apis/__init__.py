from .data_checks import check_data_roots, override_data_root
from .eval_metrics import set_eval_metrics, task_of
from .runner_setup import (
                           config_for_testing,
                           config_for_training,
                           run_testing,
                           run_training,
                           test_parser,
                           train_parser,
)

__all__ = [
    'check_data_roots', 'override_data_root', 'set_eval_metrics', 'task_of',
    'config_for_testing', 'config_for_training', 'run_testing', 'run_training', 'test_parser',
    'train_parser'
]
