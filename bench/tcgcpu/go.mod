module kvmlab.dev/bench/tcgcpu

go 1.26
