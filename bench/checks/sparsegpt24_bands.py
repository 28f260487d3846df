"""SparseGPT 2:4 on SmolLM2 at HEAD with the Hessian accumulated in N bands (argv[1]); same calibration/PPL as
bench/solvers_table. Shows how far rounding alone moves the 2:4 PPL."""
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import layerprune.hooks as hooks
hooks.HESSIAN_BANDS = int(sys.argv[1])
from bench.solvers_table import calibration, wikitext_ppl
from bench.common import MODEL
from layerprune import load_model, prune
model, tok = load_model(MODEL)
rec = prune(model, tok, method="sparsegpt", sparsity=0.5, nm=(2, 4), calibration=calibration(tok), progress=False)
print("bands", hooks.HESSIAN_BANDS, "ppl", wikitext_ppl(model, tok), flush=True)
