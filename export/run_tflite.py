"""Device side: run a .tflite model on given inputs and save its outputs (no tfq, no TensorFlow needed).

    python3 run_tflite.py --model m.tflite --inputs in.npz --outputs out.npz [--kernels reference|default]

``in.npz`` holds ``s{sample}_in{input}`` arrays; ``out.npz`` receives ``s{sample}_out{output}``.  Uses
``ai_edge_litert`` (LiteRT) when present, else the older ``tflite_runtime`` wheel (small boards).
Prints one JSON line: runtime name/version, machine, number of outputs.  ``tfq.export.bench`` runs it
under qemu for ``target="aarch64", emulate=True``; on a real board it checks the same thing natively.
"""
import argparse
import json
import platform
import re

import numpy as np


def load_interpreter_module():
    try:
        from ai_edge_litert import interpreter as module
        from importlib import metadata
        return module, f"ai-edge-litert {metadata.version('ai-edge-litert')}"
    except ImportError:
        from tflite_runtime import interpreter as module
        import tflite_runtime
        return module, f"tflite-runtime {tflite_runtime.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--outputs", required=True)
    parser.add_argument("--kernels", default="reference", choices=("reference", "default"),
                        help="reference: portable reference kernels; default: optimized kernels + XNNPACK")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    module, runtime = load_interpreter_module()
    resolver = (module.OpResolverType.BUILTIN_REF if args.kernels == "reference"
                else module.OpResolverType.AUTO)
    interpreter = module.Interpreter(model_path=args.model, num_threads=args.threads,
                                     experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    input_details, output_details = interpreter.get_input_details(), interpreter.get_output_details()

    with np.load(args.inputs) as archive:
        samples = sorted({int(re.match(r"s(\d+)_in", key).group(1)) for key in archive.files})
        inputs = {key: archive[key] for key in archive.files}
    outputs = {}
    for sample in samples:
        for position, detail in enumerate(input_details):
            interpreter.set_tensor(detail["index"], inputs[f"s{sample}_in{position}"])
        interpreter.invoke()
        for position, detail in enumerate(output_details):
            outputs[f"s{sample}_out{position}"] = interpreter.get_tensor(detail["index"]).copy()
    np.savez(args.outputs, **outputs)
    print(json.dumps({"runtime": runtime, "machine": platform.machine(), "kernels": args.kernels,
                      "num_outputs": len(output_details), "samples": len(samples)}))


if __name__ == "__main__":
    main()
