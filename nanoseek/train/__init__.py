"""nanoseek's training and evaluation library, below the commands (nanoseek/commands/) and above the core and the
engine. Each stage is a typed config and one public function:

    pretrain.pretrain(PretrainConfig) -> Path     sft.sft(SFTConfig) -> Path       sft.distill(DistillConfig) -> Path
    grpo.rl(RLConfig) -> Path                     evaluate.evaluate_checkpoint(EvalConfig) -> dict
    sample.sample_traces(SampleConfig) -> dict    ablate.ablate(AblateConfig) -> Path
    report.write_report_card(dirs, out, ...) -> Path

They share trainer.py (TrainConfig, Trainer and the one training loop, train()), record.py (run.json, loss plots,
the machine's measured peak FLOP/s) and rollout.py (prompts, sampling through the engine, rule-based scoring).
"""
