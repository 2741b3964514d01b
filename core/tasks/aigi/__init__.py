"""detect-aigi's maths: artefact features (``features``) and the calibrated classifier with its
evaluation measures (``classifier``). The train/score/eval commands that use them are not built
yet (see the project's issue on detect-aigi)."""
