"""evaluation stage: metrics (Dice, HD95, AUC, F1), statistics (bootstrap CIs, Wilcoxon, Welch), reports."""

import logging

# pandas imports numexpr, which logs its thread count at INFO level: not a message for users.
logging.getLogger("numexpr").setLevel(logging.WARNING)
