"""Many runs and what they show: the grid runner shared by `compare` and the study, the study's plan,
transfer experiment and report, paired statistics, and the analysis of child networks."""
