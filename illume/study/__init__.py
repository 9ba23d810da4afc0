"""The study of issue 24: ILLUME against SFT on gold rationales, on the project's world and model.

``runs`` runs one named run and writes its JSON record; ``report`` reads the records and draws the
curves and the summary table that docs/STUDY.md shows. Nothing here imports Ray.
"""

from illume.study.runs import RunSpec, StudyConfig, StudyContext, parse_run, run_study_run, study_grid

__all__ = ["RunSpec", "StudyConfig", "StudyContext", "parse_run", "run_study_run", "study_grid"]
