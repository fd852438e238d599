"""The gRPC server: RewardService, PreferenceService, TrainingService, health, reflection."""
