"""`dist-gru bench --accuracy`: dist-gru's recommended recipe against a plain PyTorch GRU of the same
size and budget and against the forecasters users would pick instead (statsforecast,
NeuralForecast), on real data sets that ship inside PyPI packages.

    dist-gru bench --accuracy --quick                      # a smoke run (CI)
    dist-gru bench --accuracy --sets co2,m1_yearly --seeds 3 --out runs/accuracy
    dist-gru bench --accuracy --override data.scaling=global --models dist-gru,plain-gru

Modules: `datasets` (the sets and their protocols), `ours` (dist-gru through its commands),
`plain_gru` (the independent GRU), `peers` (the other packages), `metrics`, `table` (outputs),
`suite` (the loop and options). Peers and data sets need `pip install 'dist-gru[bench]'`; a
missing one is a note in the table.
"""
