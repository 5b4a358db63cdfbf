"""linattn.toy: a trained toy video DiT to prove the method on, and the metrics that judge it.

The method's claims (which layers to linearise, which objective keeps quality) are measured on a
small diffusers WanTransformer3DModel trained on procedural videos whose content attention must
carry (fidelity.md), shipped with the package and loaded offline:

    import linattn.toy as toy
    teacher = toy.load_teacher()                          # 8 blocks, 512 tokens, frozen
    videos = toy.sample(teacher, labels=[0, 3], seed=0)   # guided, (2, 1, 16, 32, 32)
    reference = toy.teacher_reference()                   # teacher samples + figures, 3 seeds
    report = toy.evaluate(student, reference)             # rel-MSE, PSNR, class accuracy,
    print(report.table())                                 # Fréchet distance, jitter, flicker
    conditioning = toy.class_conditioning()               # a linattn.train.Conditioning;
    toy.CLASS_EMBEDDINGS_FILE                             # the same as data.embeddings

Modules, one job each: videos (the procedural data), teacher (architecture, class conditioning,
sampler, loading), sampling (guided samples from seeds), classifier (the metrics' feature
network), fidelity (the metrics), entropy (attention entropy per layer), grid (sample grids as
PNG), train (``python -m linattn.toy.train teacher|classifier`` reproduces the shipped weights),
report (``python -m linattn.toy.report`` recomputes docs/toy_teacher.md's figures), linvideo
(LinVideo run on the toy and scored against the teacher and the untrained conversion: the table
of ``python -m linattn.demo``), and the subpackage study (``python -m linattn.toy.study``: issue
9 §4's study on the teacher, written to docs/toy_study.md). In linattn.train, ``model.pretrained: linattn:toy`` and
``data.embeddings: linattn:toy`` name the teacher and its class embeddings
(linattn/train/configs/toy_wan_cpu.yaml), and a run on it logs TrainerMetrics.
Needs the ``train`` extra (diffusers).
"""
from .classifier import VideoClassifier, load_classifier
from .fidelity import (FidelityReport, Figure, PairedGap, TeacherReference, TrainerMetrics,
                       evaluate, frechet_distance, jitter, paired_class_gap, psnr,
                       teacher_reference, trajectory_jitter)
from .sampling import balanced_labels, sample, sample_noise
from .teacher import (CLASS_EMBEDDINGS_FILE, NULL_CLASS, SAMPLER, TEACHER_CONFIG, TEACHER_DIR,
                      Sampler, build_teacher, class_conditioning, class_embedding_table,
                      embed_labels, load_teacher, null_embedding)
from .videos import (DIRECTIONS, NUM_CLASSES, NUM_FRAMES, VIDEO_SHAPE, Videos, class_name,
                     procedural_videos)

__all__ = ["procedural_videos", "Videos", "class_name", "NUM_CLASSES", "NUM_FRAMES",
           "VIDEO_SHAPE", "DIRECTIONS", "load_teacher", "build_teacher", "TEACHER_CONFIG",
           "TEACHER_DIR", "Sampler", "SAMPLER", "class_conditioning", "class_embedding_table",
           "embed_labels", "null_embedding", "NULL_CLASS", "CLASS_EMBEDDINGS_FILE", "sample",
           "sample_noise", "balanced_labels", "VideoClassifier", "load_classifier",
           "teacher_reference", "evaluate", "TrainerMetrics", "TeacherReference", "FidelityReport", "Figure",
           "PairedGap", "paired_class_gap",
           "psnr", "jitter", "trajectory_jitter", "frechet_distance"]
