"""Training jobs: the trainer backend seam (backend.py), the local `accelerate launch` backend
(local.py, launch.py, job.py), and the loop that drives a job for the train stage (drive.py)."""
