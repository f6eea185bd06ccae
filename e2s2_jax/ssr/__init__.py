"""SSR (sequence span rewriting): word-level span sampling, the offline generation job that
fills masked spans with a generator model, and the SeqIO tasks that pretrain on its records."""
