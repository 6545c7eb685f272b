// Driver for tests/test_ap_fixed_headers.py. Linked with generated units that define
// cast_lookup() (the dispatch table of all cast instantiations) and print_arith_checks().
//
//   apfixed_check cast JOBS IN OUT  JOBS: int64 pairs (type id, count); IN: the doubles of every
//                                   job back to back; OUT: one uint64 raw W-bit pattern per double
//   apfixed_check arith             result types and accumulator sums, one line per check
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "apfixed_check.h"

CastFn cast_lookup(long id);  // generated
void print_arith_checks();    // generated

template <class T>
static std::vector<T> read_all(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) { perror(path); exit(2); }
  fseek(f, 0, SEEK_END);
  long bytes = ftell(f);
  fseek(f, 0, SEEK_SET);
  std::vector<T> data(bytes / sizeof(T));
  if (fread(data.data(), sizeof(T), data.size(), f) != data.size()) { perror(path); exit(2); }
  fclose(f);
  return data;
}

static int run_casts(const char* jobs_path, const char* in_path, const char* out_path) {
  std::vector<int64_t> jobs = read_all<int64_t>(jobs_path);
  std::vector<double> in = read_all<double>(in_path);
  std::vector<uint64_t> out(in.size());
  size_t pos = 0;
  for (size_t j = 0; j + 1 < jobs.size(); j += 2) {
    CastFn fn = cast_lookup((long)jobs[j]);
    size_t n = (size_t)jobs[j + 1];
    if (!fn || pos + n > in.size()) { fprintf(stderr, "bad job %ld\n", (long)jobs[j]); return 2; }
    fn(in.data() + pos, n, out.data() + pos);
    pos += n;
  }
  FILE* f = fopen(out_path, "wb");
  if (!f || fwrite(out.data(), sizeof(uint64_t), out.size(), f) != out.size()) {
    perror(out_path);
    return 2;
  }
  fclose(f);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 5 && !strcmp(argv[1], "cast")) return run_casts(argv[2], argv[3], argv[4]);
  if (argc == 2 && !strcmp(argv[1], "arith")) { print_arith_checks(); return 0; }
  fprintf(stderr, "usage: %s cast JOBS IN OUT | %s arith\n", argv[0], argv[0]);
  return 2;
}
