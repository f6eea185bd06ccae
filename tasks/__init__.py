"""SeqIO registrations: importing `tasks` registers the bundled-corpus, downstream and C4 tasks and
mixtures (the demo vocabulary for the first two).

Other code registers its own with register_text_task / register_tfds_task / register_ssr_task /
register_mixture; registering a name twice replaces the first registration.
"""

from __future__ import annotations

from tasks.bundled import (
    BUNDLED_MIXTURES,
    BUNDLED_TASKS,
    register_bundled_tasks,
    try_register_bundled_tasks,
)
from tasks.c4 import C4_TASKS, register_c4_tasks
from tasks.downstream import (
    DOWNSTREAM_TASKS,
    register_downstream_tasks,
    register_gec_files_task,
    register_glue_tasks,
)
from tasks.finetune import RESTORE_CASE_TASK, register_finetune_tasks
from tasks.registration import (
    register_mixture,
    register_ssr_task,
    register_text_task,
    register_tfds_task,
)

__all__ = [
    "BUNDLED_MIXTURES",
    "BUNDLED_TASKS",
    "C4_TASKS",
    "DOWNSTREAM_TASKS",
    "RESTORE_CASE_TASK",
    "register_bundled_tasks",
    "register_c4_tasks",
    "register_downstream_tasks",
    "register_finetune_tasks",
    "register_gec_files_task",
    "register_glue_tasks",
    "register_mixture",
    "register_ssr_task",
    "register_text_task",
    "register_tfds_task",
]

if try_register_bundled_tasks():
    register_finetune_tasks()
    register_downstream_tasks()  # files are read on first use
register_c4_tasks()
