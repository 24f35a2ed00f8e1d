"""rlkd_onpolicy: on-policy, speculative and ranking-loss knowledge distillation for language models.

`import rlkd_onpolicy` stays light: the losses and metrics are plain torch; heavy optional dependencies
(triton, deepspeed) are imported only where used.
"""

__version__ = "0.1.0"
