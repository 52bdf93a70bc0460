"""The shipped recipes, installed with kdship as kdship.recipes: `--recipe task_kd` finds task_kd.yaml here."""
