"""detect-aigi: detectors of AI-generated images.

- :mod:`.features`: the artefact feature groups (NPR, bit planes, spectrum);
- :mod:`.classifier`: logistic regression, Platt scaling, threshold, AP/AUROC/ECE;
- :mod:`.fusion`: per-group regressions fused by a stacked one, leave-one-generator-out folds;
- :mod:`.detector`: labelled inputs, the feature extractor and task, the detector file,
  training, scoring and evaluation;
- :mod:`.job`: the train and eval jobs the CLI runs (features through the pipeline, resumable).
"""
