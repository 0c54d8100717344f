"""The command line's commands, one home each: `guard` (calibrate, generate, eval: the PyTorch side),
`bundle` (export, run, chat, inspect, bench, build-trt), `serve` (the OpenAI-compatible server), and
`options` (what several share). `steerguard.cli` makes the group and registers them; nothing here
imports it back."""
