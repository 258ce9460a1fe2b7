// SPDX-License-Identifier: GPL-2.0
/*
 * coco_race: Linux's own private<->shared conversions, measured as a TD
 * under the TDX-module emulator (issue 8, "Linux's side").
 *
 * mode=race: a kthread bound to the first online CPU converts page B of a
 * physically contiguous pair A|B back and forth with set_memory_decrypted()
 * / set_memory_encrypted() (Linux's order, untouched), writing a fresh
 * pattern into B after every conversion, while a kthread on every other
 * online CPU runs load_unaligned_zeropad(A + PAGE_SIZE - k), k = 1..7: an
 * 8-byte load that crosses into B. Prints
 *   RACE kernel=linux-<release> cpus=<online> conversions=C loads=L
 *        fixups=F wrong_bytes=B conversion_errors=E
 * and writes snapshot tags 1 (before) and 2 (after) to the emulator's
 * counter-snapshot port 0xf8.
 *
 * mode=bench: for each page count P in sizes=, bench_rounds times, times
 * set_memory_decrypted(va, P) and set_memory_encrypted(va, P) in TSC
 * cycles and prints the medians:
 *   BENCH kernel=linux-<release> order=linux platform=td cpus=<online>
 *         pages=<P> dir=to-shared|to-private cycles=<median>
 * and writes snapshot tag 1000000 + 10 * P + 0 before each timed
 * set_memory_decrypted(), + 1 before each set_memory_encrypted() and + 9
 * after the last round, so the counters between one tag and the next are
 * one call's (the guest kernel's benchmark writes the same tags).
 *
 * Every run ends with one "CORACE done mode=<m> result=<errno>" line. Bad input
 * (an unknown mode, 0 rounds, a page count of 0 or above the buffer, fewer
 * than 2 online CPUs for the race) is refused with a message and -EINVAL;
 * every wait is bounded by timeout_s=, so nothing hangs.
 */

#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/kernel.h>
#include <linux/kthread.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/gfp.h>
#include <linux/mm.h>
#include <linux/set_memory.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/string.h>
#include <linux/utsname.h>
#include <linux/cpumask.h>
#include <linux/sched.h>
#include <linux/jiffies.h>
#include <asm/word-at-a-time.h>
#include <asm/msr.h>
#include <asm/io.h>

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Linux's private/shared conversion race and cost benchmark, as a TD");

static char *mode = "race";
module_param(mode, charp, 0444);
MODULE_PARM_DESC(mode, "race or bench");
static unsigned int rounds = 1000;
module_param(rounds, uint, 0444);
MODULE_PARM_DESC(rounds, "race: back-and-forth conversions of page B (1..1000000)");
static char *sizes = "1,16,64,512";
module_param(sizes, charp, 0444);
MODULE_PARM_DESC(sizes, "bench: comma-separated page counts, each 1..512");
static unsigned int bench_rounds = 20;
module_param(bench_rounds, uint, 0444);
MODULE_PARM_DESC(bench_rounds, "bench: timed conversions per size and direction (1..1000)");
static unsigned int timeout_s = 150;
module_param(timeout_s, uint, 0444);
MODULE_PARM_DESC(timeout_s, "bound on every wait, in seconds (1..3600)");

#define SNAPSHOT_PORT 0xf8
#define MAX_ROUNDS 1000000u
#define MAX_BENCH_ROUNDS 1000u
#define BENCH_ORDER 9 /* the buffer: 512 pages, 2 MiB aligned */
#define BENCH_MAX_PAGES (1u << BENCH_ORDER)
#define MAX_SIZES 16

/* A thread of ours may still run after a timed-out wait: init must then
 * return 0, since a failed init frees the module's text under it. */
static bool threads_may_run;

static void snapshot(u32 tag)
{
	outl(tag, SNAPSHOT_PORT);
}

/* The bench's tag before a call (phase 0 to shared, 1 to private) or after
 * a size's last round (phase 9). */
static u32 bench_tag(unsigned int pages, unsigned int phase)
{
	return 1000000 + 10 * pages + phase;
}

static const char *release(void)
{
	return init_utsname()->release;
}

/* ---- race ---------------------------------------------------------------- */

/* Byte i of the pattern written after conversion number n: never zero,
 * different from n - 1 and n + 1 at every position (shared and private
 * states alternate with n), changing every round. */
static inline u8 pattern_byte(unsigned long n, unsigned int i)
{
	return 1 + (u8)((n * 7 + i * 31) % 255);
}

static inline u8 a_byte(unsigned int j)
{
	return 0x40 + (j % 61);
}

struct race {
	u8 *a; /* A, then B = a + PAGE_SIZE */
	unsigned long seq; /* pattern number B holds (written before published) */
	bool stop;
	bool converter_done;
	atomic_t loaders_ready;
	unsigned int nloaders;
	unsigned long conversions;
	unsigned long conversion_errors;
	int first_error;
	struct completion converted;
	struct completion loaders_finished;
	atomic_t loaders_running;
};

struct loader {
	struct race *race;
	unsigned long loads, fixups, wrong_bytes;
	u64 first_wrong;
	unsigned int first_wrong_k;
};

static void write_pattern(u8 *b, unsigned long n)
{
	u64 word = 0;
	unsigned int i;

	for (i = 0; i < 8; i++)
		word |= (u64)pattern_byte(n, i) << (8 * i);
	WRITE_ONCE(*(u64 *)b, word);
}

static int converter_fn(void *data)
{
	struct race *r = data;
	u8 *b = r->a + PAGE_SIZE;
	unsigned long deadline = jiffies + timeout_s * HZ;
	unsigned long n = 0;
	unsigned int round;

	/* Bounded wait for every loader to spin. */
	while (atomic_read(&r->loaders_ready) < r->nloaders && !READ_ONCE(r->stop)) {
		if (time_after(jiffies, deadline)) {
			pr_err("coco_race: loaders did not start within %us\n", timeout_s);
			WRITE_ONCE(r->stop, true);
			break;
		}
		cond_resched();
	}
	for (round = 0; round < rounds && !READ_ONCE(r->stop); round++) {
		int ret = set_memory_decrypted((unsigned long)b, 1);

		if (ret) {
			r->first_error = ret;
			r->conversion_errors++;
			break;
		}
		r->conversions++;
		write_pattern(b, ++n);
		smp_store_release(&r->seq, n);

		ret = set_memory_encrypted((unsigned long)b, 1);
		if (ret) {
			r->first_error = ret;
			r->conversion_errors++;
			break;
		}
		r->conversions++;
		write_pattern(b, ++n);
		smp_store_release(&r->seq, n);
		if (time_after(jiffies, deadline)) {
			pr_err("coco_race: converter stopped at round %u: over %us\n", round, timeout_s);
			break;
		}
		cond_resched();
	}
	WRITE_ONCE(r->converter_done, true);
	/* Completes and exits without returning into this module's text,
	 * which init's return may already have freed. */
	kthread_complete_and_exit(&r->converted, 0);
}

static void classify(struct loader *l, u64 v, unsigned int k, unsigned long before,
		     unsigned long after)
{
	unsigned int i, zeros = 0, bad = 0;

	for (i = 0; i < k; i++) {
		if ((u8)(v >> (8 * i)) != a_byte(PAGE_SIZE - k + i))
			bad++;
	}
	for (i = k; i < 8; i++) {
		u8 got = (u8)(v >> (8 * i));
		unsigned long n;
		bool ok = false;

		if (!got) {
			zeros++;
			continue;
		}
		/* The pattern of some conversion between the two reads of seq
		 * (after + 1: written, not yet published). */
		for (n = before; n <= after + 1 && !ok; n++)
			ok = got == pattern_byte(n, i - k);
		if (!ok)
			bad++;
	}
	if (!bad && zeros == 8 - k) {
		l->fixups++;
	} else if (bad || zeros) {
		if (!l->wrong_bytes) {
			l->first_wrong = v;
			l->first_wrong_k = k;
		}
		l->wrong_bytes++;
	}
}

static int loader_fn(void *data)
{
	struct loader *l = data;
	struct race *r = l->race;
	const u8 *end = r->a + PAGE_SIZE;
	unsigned long iterations = 0;

	atomic_inc(&r->loaders_ready);
	while (!READ_ONCE(r->stop)) {
		unsigned int k;

		for (k = 1; k <= 7; k++) {
			unsigned long before = smp_load_acquire(&r->seq);
			u64 v = load_unaligned_zeropad(end - k);
			unsigned long after;

			barrier();
			after = smp_load_acquire(&r->seq);
			l->loads++;
			classify(l, v, k, before, after);
		}
		if (++iterations % 16 == 0)
			cond_resched();
	}
	if (atomic_dec_and_test(&r->loaders_running))
		kthread_complete_and_exit(&r->loaders_finished, 0);
	kthread_exit(0);
}

static int run_race(void)
{
	unsigned int cpus = num_online_cpus(), cpu, conv_cpu, i = 0;
	unsigned long loads = 0, fixups = 0, wrong = 0;
	struct task_struct *conv, **tasks;
	struct loader *loaders;
	struct page *pages;
	struct race *r;
	bool leak = false;
	int ret = 0;

	if (cpus < 2) {
		pr_err("coco_race: race needs at least 2 online CPUs, have %u\n", cpus);
		return -EINVAL;
	}
	if (rounds == 0 || rounds > MAX_ROUNDS) {
		pr_err("coco_race: rounds=%u: want 1..%u\n", rounds, MAX_ROUNDS);
		return -EINVAL;
	}
	r = kzalloc(sizeof(*r), GFP_KERNEL);
	loaders = kcalloc(cpus, sizeof(*loaders), GFP_KERNEL);
	tasks = kcalloc(cpus, sizeof(*tasks), GFP_KERNEL);
	pages = alloc_pages(GFP_KERNEL, 1);
	if (!r || !loaders || !tasks || !pages) {
		ret = -ENOMEM;
		goto out_free;
	}
	r->a = page_address(pages);
	for (i = 0; i < PAGE_SIZE; i++)
		r->a[i] = a_byte(i);
	memset(r->a + PAGE_SIZE, 0xee, PAGE_SIZE);
	write_pattern(r->a + PAGE_SIZE, 0);
	r->seq = 0;
	init_completion(&r->converted);
	init_completion(&r->loaders_finished);

	conv_cpu = cpumask_first(cpu_online_mask);
	conv = kthread_create(converter_fn, r, "coco_race_conv");
	if (IS_ERR(conv)) {
		ret = PTR_ERR(conv);
		goto out_free;
	}
	kthread_bind(conv, conv_cpu);

	i = 0;
	for_each_online_cpu(cpu) {
		struct task_struct *t;

		if (cpu == conv_cpu || i >= cpus - 1)
			continue;
		loaders[i].race = r;
		t = kthread_create(loader_fn, &loaders[i], "coco_race_load/%u", cpu);
		if (IS_ERR(t))
			break;
		kthread_bind(t, cpu);
		tasks[i++] = t;
	}
	r->nloaders = i;
	atomic_set(&r->loaders_running, i);
	if (i == 0) {
		/* The converter never ran: wake it with stop set, it exits. */
		WRITE_ONCE(r->stop, true);
		wake_up_process(conv);
		wait_for_completion_timeout(&r->converted, timeout_s * HZ);
		pr_err("coco_race: no loader thread could be created\n");
		ret = -ENOMEM;
		goto out_free;
	}

	snapshot(1);
	for (cpu = 0; cpu < r->nloaders; cpu++)
		wake_up_process(tasks[cpu]);
	wake_up_process(conv);

	if (!wait_for_completion_timeout(&r->converted, (timeout_s + 5) * HZ)) {
		pr_err("coco_race: converter did not finish within %us\n", timeout_s + 5);
		ret = -ETIMEDOUT;
		leak = true;
		threads_may_run = true;
	}
	WRITE_ONCE(r->stop, true);
	/* A live loader sees the flag within one pass of its loop; one that
	 * died (an oops kills the thread) never will: wait briefly. */
	if (!wait_for_completion_timeout(&r->loaders_finished, min(timeout_s, 10u) * HZ)) {
		pr_err("coco_race: %d loader(s) did not stop within %us (dead?)\n",
		       atomic_read(&r->loaders_running), min(timeout_s, 10u));
		ret = -ETIMEDOUT;
		leak = true;
		threads_may_run = true;
	}
	snapshot(2);

	for (i = 0; i < r->nloaders; i++) {
		loads += loaders[i].loads;
		fixups += loaders[i].fixups;
		wrong += loaders[i].wrong_bytes;
		if (loaders[i].wrong_bytes)
			pr_info("coco_race: loader %u: first wrong load k=%u value=%016llx\n", i,
				loaders[i].first_wrong_k, loaders[i].first_wrong);
	}
	pr_info("RACE kernel=linux-%s cpus=%u conversions=%lu loads=%lu fixups=%lu wrong_bytes=%lu conversion_errors=%lu\n",
		release(), cpus, r->conversions, loads, fixups, wrong, r->conversion_errors);
	if (r->conversion_errors) {
		/* As Linux does: a page whose conversion failed is leaked. */
		pr_err("coco_race: conversion failed (%d) after %lu conversions; leaking the pages\n",
		       r->first_error, r->conversions);
		leak = true;
		if (!ret)
			ret = r->first_error;
	}
	if (leak) {
		/* Threads may still run or the page's state is unknown: leak. */
		kfree(tasks);
		return ret;
	}
out_free:
	if (pages)
		__free_pages(pages, 1);
	kfree(tasks);
	kfree(loaders);
	kfree(r);
	return ret;
}

/* ---- bench --------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

static u64 median(u64 *v, unsigned int n)
{
	sort(v, n, sizeof(*v), cmp_u64, NULL);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int parse_sizes(unsigned int *out, unsigned int *count)
{
	char *copy, *cursor, *word;
	int ret = 0;

	*count = 0;
	copy = kstrdup(sizes ? sizes : "", GFP_KERNEL);
	if (!copy)
		return -ENOMEM;
	cursor = copy;
	while ((word = strsep(&cursor, ",")) != NULL) {
		unsigned int pages;

		if (kstrtouint(word, 10, &pages)) {
			pr_err("coco_race: sizes=%s: %s is not a page count\n", sizes, word);
			ret = -EINVAL;
			break;
		}
		if (pages == 0 || pages > BENCH_MAX_PAGES) {
			pr_err("coco_race: sizes=%s: %u pages: want 1..%u (the buffer)\n", sizes,
			       pages, BENCH_MAX_PAGES);
			ret = -EINVAL;
			break;
		}
		if (*count == MAX_SIZES) {
			pr_err("coco_race: sizes=%s: more than %u sizes\n", sizes, MAX_SIZES);
			ret = -EINVAL;
			break;
		}
		out[(*count)++] = pages;
	}
	kfree(copy);
	if (!ret && *count == 0) {
		pr_err("coco_race: sizes= is empty\n");
		ret = -EINVAL;
	}
	return ret;
}

static int run_bench(void)
{
	unsigned int list[MAX_SIZES], count, s, i, cpus = num_online_cpus();
	u64 *shared = NULL, *private = NULL;
	int ret;

	ret = parse_sizes(list, &count);
	if (ret)
		return ret;
	if (bench_rounds == 0 || bench_rounds > MAX_BENCH_ROUNDS) {
		pr_err("coco_race: bench_rounds=%u: want 1..%u\n", bench_rounds, MAX_BENCH_ROUNDS);
		return -EINVAL;
	}
	shared = kcalloc(bench_rounds, sizeof(u64), GFP_KERNEL);
	private = kcalloc(bench_rounds, sizeof(u64), GFP_KERNEL);
	if (!shared || !private) {
		ret = -ENOMEM;
		goto out;
	}
	for (s = 0; s < count; s++) {
		unsigned int p = list[s], order = get_order((size_t)p * PAGE_SIZE);
		unsigned long deadline = jiffies + timeout_s * HZ;
		struct page *pages = alloc_pages(GFP_KERNEL, order);
		unsigned long va;
		unsigned int done = 0;

		if (!pages) {
			pr_err("coco_race: bench: no order-%u block for %u pages\n", order, p);
			ret = -ENOMEM;
			break;
		}
		va = (unsigned long)page_address(pages);
		for (i = 0; i < bench_rounds; i++) {
			u64 t0, t1, t2, t3;
			int e;

			snapshot(bench_tag(p, 0));
			t0 = rdtsc_ordered();
			e = set_memory_decrypted(va, p);
			t1 = rdtsc_ordered();
			if (e) {
				pr_err("coco_race: bench: set_memory_decrypted(%u pages) = %d; leaking them\n",
				       p, e);
				ret = e;
				break;
			}
			snapshot(bench_tag(p, 1));
			t2 = rdtsc_ordered();
			e = set_memory_encrypted(va, p);
			t3 = rdtsc_ordered();
			if (e) {
				pr_err("coco_race: bench: set_memory_encrypted(%u pages) = %d; leaking them\n",
				       p, e);
				ret = e;
				break;
			}
			shared[i] = t1 - t0;
			private[i] = t3 - t2;
			done++;
			if (time_after(jiffies, deadline)) {
				pr_err("coco_race: bench: %u pages: stopped after %u rounds (over %us)\n",
				       p, done, timeout_s);
				break;
			}
			cond_resched();
		}
		snapshot(bench_tag(p, 9));
		if (done) {
			pr_info("BENCH kernel=linux-%s order=linux platform=td cpus=%u pages=%u dir=to-shared cycles=%llu rounds=%u\n",
				release(), cpus, p, median(shared, done), done);
			pr_info("BENCH kernel=linux-%s order=linux platform=td cpus=%u pages=%u dir=to-private cycles=%llu rounds=%u\n",
				release(), cpus, p, median(private, done), done);
		}
		if (ret)
			break; /* the block's state is unknown: leak it */
		__free_pages(pages, order);
	}
out:
	kfree(shared);
	kfree(private);
	return ret;
}

static int __init coco_race_init(void)
{
	int ret;

	if (timeout_s == 0 || timeout_s > 3600) {
		pr_err("coco_race: timeout_s=%u: want 1..3600\n", timeout_s);
		ret = -EINVAL;
	} else if (mode && !strcmp(mode, "race")) {
		ret = run_race();
	} else if (mode && !strcmp(mode, "bench")) {
		ret = run_bench();
	} else {
		pr_err("coco_race: mode=%s: want race or bench\n", mode ? mode : "(null)");
		ret = -EINVAL;
	}
	pr_info("CORACE done mode=%s result=%d\n", mode ? mode : "(null)", ret);
	/*
	 * Refused input fails the load (-EINVAL). A failure once the work ran
	 * (a conversion error, a timeout) is reported above and the load
	 * succeeds: busybox's insmod retries a failed finit_module with
	 * init_module, which would run the race a second time (seen here);
	 * and a thread of ours may still run after a timed-out wait, while a
	 * failed init frees the module's text.
	 */
	return ret == -EINVAL && !threads_may_run ? ret : 0;
}

static void __exit coco_race_exit(void)
{
}

module_init(coco_race_init);
module_exit(coco_race_exit);
