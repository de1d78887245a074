"""The training engine of train_student.py and train_student_rl.py (README, "Code map")."""
