// Stream harness of a Verilated Amaranth top (generated parts are filled in by sim/verilator.py).
//
// One run: read the run file (limits, VCD path, one line per port in signature order), feed every input stream
// from its beat file (valid held with its payload until accepted, idling at random between beats), take beats
// from every output stream (ready withheld at random), set plain inputs when a stream reaches a given beat, log
// every change of plain outputs, and stop when every output has given its beats. Cycles are counted from the
// first input offered to the last output taken, as the Python harness counts them.
#include "Vtop.h"
#include "verilated.h"
#if VM_TRACE
#include "verilated_vcd_c.h"
#endif
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

/*COUNTS*/

struct Rng {
    uint64_t s;
    double idle;
    bool stall() {
        if (idle <= 0.0) return false;
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        return (s >> 11) * (1.0 / 9007199254740992.0) < idle;
    }
};

static std::vector<uint32_t> load(const char *path, size_t words) {
    std::vector<uint32_t> data(words);
    FILE *f = fopen(path, "rb");
    if (!f || (words && fread(data.data(), 4, words, f) != words)) { fprintf(stderr, "cannot read %s\n", path); exit(2); }
    fclose(f);
    return data;
}

struct Src {
    std::vector<uint32_t> data;
    size_t words = 1, beats = 0, total = 0, index = 0;
    bool presenting = false;
    Rng rng;
    bool present() {
        if (!presenting && index < total && !rng.stall()) presenting = true;
        return presenting;
    }
    const uint32_t *beat() const { return &data[(index % beats) * words]; }
    void accepted() { presenting = false; index++; }
};

struct Snk {
    std::vector<uint32_t> data;
    size_t words = 1, count = 0, got = 0;
    Rng rng;
    bool ready = false;
    bool want() { ready = got < count && !rng.stall(); return ready; }
    uint32_t *slot() { return &data[got * words]; }
    void accepted() { got++; }
};

struct Watch {
    FILE *f = nullptr;
    size_t words = 1;
    uint64_t last = ~0ull;
    void see(uint64_t cycle, const uint32_t *d) {
        uint64_t v = d[0] | (words > 1 ? (uint64_t)d[1] << 32 : 0);
        if (v != last) { uint64_t rec[2] = {cycle, v}; fwrite(rec, 8, 2, f); last = v; }
    }
};

static Src src[N_SRC ? N_SRC : 1];
static Snk snk[N_SNK ? N_SNK : 1];
static Watch watch[N_WATCH ? N_WATCH : 1];
struct SideEvents {
    std::vector<uint32_t> data;
    std::vector<int> stream;
    std::vector<size_t> at;
    size_t words = 1, next = 0;
};
static SideEvents sides[N_SIDE ? N_SIDE : 1];

// The event of side input i now due (its stream reached the beat), or null.
static const uint32_t *side_due(int i) {
    SideEvents &e = sides[i];
    if (e.next < e.at.size() && src[e.stream[e.next]].index >= e.at[e.next] && !src[e.stream[e.next]].presenting)
        return &e.data[(e.next++) * e.words];
    return nullptr;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: vsim RUNFILE\n"); return 2; }
    FILE *cfg = fopen(argv[1], "r");
    if (!cfg) { fprintf(stderr, "cannot read %s\n", argv[1]); return 2; }
    unsigned long long max_cycles;
    char path[4096], vcd[4096];
    if (fscanf(cfg, "%llu %4095s", &max_cycles, vcd) != 2) { fprintf(stderr, "bad run file\n"); return 2; }
    std::vector<std::string> sink_paths;
    for (int i = 0; i < N_SRC; i++) {
        size_t beats, repeat; unsigned long long seed; double idle;
        if (fscanf(cfg, "%4095s %zu %zu %lf %llu", path, &beats, &repeat, &idle, &seed) != 5) return 2;
        src[i].words = SRC_WORDS[i]; src[i].beats = beats; src[i].total = beats * repeat;
        src[i].data = load(path, beats * SRC_WORDS[i]);
        src[i].rng = Rng{seed, idle};
    }
    for (int i = 0; i < N_SNK; i++) {
        size_t count; unsigned long long seed; double idle;
        if (fscanf(cfg, "%4095s %zu %lf %llu", path, &count, &idle, &seed) != 4) return 2;
        snk[i].words = SNK_WORDS[i]; snk[i].count = count;
        snk[i].data.assign(count * SNK_WORDS[i], 0);
        snk[i].rng = Rng{seed, idle};
        sink_paths.push_back(path);
    }
    for (int i = 0; i < N_SIDE; i++) {
        size_t events;
        if (fscanf(cfg, "%4095s %zu", path, &events) != 2) return 2;
        sides[i].words = SIDE_WORDS[i];
        sides[i].data = load(path, events * SIDE_WORDS[i]);
        for (size_t k = 0; k < events; k++) {
            int stream; size_t at;
            if (fscanf(cfg, "%d %zu", &stream, &at) != 2) return 2;
            sides[i].stream.push_back(stream); sides[i].at.push_back(at);
        }
    }
    for (int i = 0; i < N_WATCH; i++) {
        if (fscanf(cfg, "%4095s", path) != 1) return 2;
        watch[i].words = WATCH_WORDS[i];
        watch[i].f = fopen(path, "wb");
    }
    fclose(cfg);

    Verilated::commandArgs(argc, argv);
    Vtop *top = new Vtop;
#if VM_TRACE
    VerilatedVcdC *trace = nullptr;
    if (std::string(vcd) != "-") {
        Verilated::traceEverOn(true);
        trace = new VerilatedVcdC;
        top->trace(trace, 99);
        trace->open(vcd);
    }
#endif
    top->clk = 0;
    top->rst = 0;
    size_t wanted = 0;
    for (int i = 0; i < N_SNK; i++) wanted += snk[i].count;
    size_t taken = 0;
    unsigned long long cycle = 0;
    auto started = std::chrono::steady_clock::now();
    while (taken < wanted && cycle < max_cycles) {
        // inputs for the coming edge: side-band values first (they precede their stream's beat), then streams
/*SIDE*/
/*DRIVE*/
        top->clk = 0;
        top->eval();
#if VM_TRACE
        if (trace) trace->dump((uint64_t)(cycle * 10000 + 5000));
#endif
/*SAMPLE*/
/*WATCH*/
        top->clk = 1;
        top->eval();
        cycle++;
#if VM_TRACE
        if (trace) trace->dump((uint64_t)(cycle * 10000));
#endif
/*ADVANCE*/
        taken = 0;
        for (int i = 0; i < N_SNK; i++) taken += snk[i].got;
        if ((cycle & 0x1FFFF) == 0) { printf("progress %llu %zu\n", cycle, taken); fflush(stdout); }
    }
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    for (int i = 0; i < N_SNK; i++) {
        FILE *f = fopen(sink_paths[i].c_str(), "wb");
        fwrite(snk[i].data.data(), 4, snk[i].got * snk[i].words, f);
        fclose(f);
    }
    for (int i = 0; i < N_WATCH; i++) fclose(watch[i].f);
#if VM_TRACE
    if (trace) trace->close();
#endif
    top->final();
    printf("seconds %.6f\ncycles %llu\n", seconds, cycle);
    delete top;
    return 0;
}
