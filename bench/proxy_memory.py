"""Peak RSS of the KL proxy (``--allocation auto``'s finalists) on a 2-block random model with Gemma-3-270m's width and
its 262k vocabulary: its setup and one KL score, over the RSS of the model itself. ``new``: the proxy reads the model
and prunes a bf16 copy, keeping the dense final hidden states; ``old``: the proxy as it was before (a deep copy of the
model taken over, full-vocabulary dense log-probabilities) -- run ``old`` from a checkout of an earlier commit.

    OMP_NUM_THREADS=1 python -m bench.proxy_memory new
"""
import copy
import resource
import sys
import time

import torch
import transformers as T

torch.set_num_threads(1)
from layerprune.search.proxy import Proxy
cfg = T.Gemma3TextConfig(hidden_size=640, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=256, intermediate_size=2048, vocab_size=262144, tie_word_embeddings=True,
                         query_pre_attn_scalar=256, sliding_window=512,
                         layer_types=["sliding_attention", "full_attention"])
torch.manual_seed(0)
m = T.Gemma3ForCausalLM(cfg).eval()
g = torch.Generator().manual_seed(0)
calib = torch.randint(0, 49152, (2, 512), generator=g)
ev = torch.randint(0, 49152, (1, 4 * 512), generator=g)


def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


r0 = rss(); t = time.perf_counter()
kw = dict(seqlen=512, windows=4, metric="kl", ranks=False)
p = (Proxy(m, calib, ev, 0.7, keep_model=True, **kw) if sys.argv[1] == "new"
     else Proxy(copy.deepcopy(m), calib, ev, 0.7, **kw))
r1 = rss(); t1 = time.perf_counter()
v = p.evaluate_allocation([0.7, 0.7])
print(f"{sys.argv[1]}: model {r0:.0f} MB; peak after setup {r1:.0f} MB (+{r1 - r0:.0f}); after one KL score "
      f"{rss():.0f} MB (+{rss() - r0:.0f}); setup {t1 - t:.1f}s, score {time.perf_counter() - t1:.1f}s; KL {v:.6f}")
