// A Java heap random-read program for hugepaged's benchmark: one long[] of N MiB on the heap,
// filled once, then random reads on command. No -XX:+UseTransparentHugePages: the heap is
// plain 4 KiB-mapped anonymous memory unless something collapses it.
//
// stdin commands, one reply line each on stdout:
//   run SECONDS   random reads for SECONDS; replies "reads_per_s R"
//   gaps SECONDS  random reads in batches of 2^14 for SECONDS; replies "gaps_ns g1 g2 ..." with
//                 the time between the starts of consecutive batches (a stall shows as a gap)
//   check         replies "ok" if every element still holds its pattern, "bad INDEX" if not
//   quit
import java.io.BufferedReader;
import java.io.InputStreamReader;

public final class HeapReader {
    static long[] heap;
    static long sink;

    static long pattern(long i) { return i * 0x9E3779B97F4A7C15L + 12345; }

    static long readFor(long nanos, long[] gaps) {
        final long[] h = heap;
        final int mask = Integer.highestOneBit(h.length) - 1;
        long x = System.nanoTime() | 1, reads = 0, acc = 0;
        final long t0 = System.nanoTime();
        long last = t0;
        int g = 0;
        while (true) {
            for (int k = 0; k < 16384; k++) {
                x ^= x << 13; x ^= x >>> 7; x ^= x << 17;
                acc += h[(int) (x & mask)];
            }
            reads += 16384;
            long now = System.nanoTime();
            if (gaps != null && g < gaps.length) gaps[g++] = now - last;
            last = now;
            if (now - t0 >= nanos) break;
        }
        sink += acc;
        if (gaps != null && g < gaps.length) gaps[g] = -1;
        return (long) (reads * 1e9 / (System.nanoTime() - t0));
    }

    public static void main(String[] args) throws Exception {
        int mib = Integer.parseInt(args[0]);
        heap = new long[mib * (1 << 17)];
        for (int i = 0; i < heap.length; i++) heap[i] = pattern(i);
        System.out.println("ready " + heap.length);
        System.out.flush();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null) {
            String[] w = line.trim().split("\\s+");
            if (w[0].equals("run")) {
                long r = readFor((long) (Double.parseDouble(w[1]) * 1e9), null);
                System.out.println("reads_per_s " + r);
            } else if (w[0].equals("gaps")) {
                long[] gaps = new long[4_000_000];
                readFor((long) (Double.parseDouble(w[1]) * 1e9), gaps);
                StringBuilder sb = new StringBuilder("gaps_ns");
                for (long v : gaps) { if (v < 0) break; sb.append(' ').append(v); }
                System.out.println(sb);
            } else if (w[0].equals("check")) {
                String res = "ok";
                for (int i = 0; i < heap.length; i++)
                    if (heap[i] != pattern(i)) { res = "bad " + i; break; }
                System.out.println(res);
            } else if (w[0].equals("quit")) {
                break;
            }
            System.out.flush();
        }
        System.out.println("sink " + (sink & 1));
    }
}
