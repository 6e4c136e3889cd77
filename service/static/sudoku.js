// The Sudoku board: clues from the prompt, digits from the canvas, conflicts and the solved state.

export const EXAMPLES = [
  "..589.2.1784.5.....92346..75.7283...6..514..2.1....3...7.4.196.....357....1.784.3",
  ".....7.9.376..9.25...54.6.34.2.3..816.....34.5...147.976.9.....941....3.8.....916",
  "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79",
];

export function isPuzzle(prompt) {
  return /^[1-9.]{81}$/.test(prompt.trim());
}

const unit = (kind, i) =>
  [...Array(9).keys()].map((k) =>
    kind === 0 ? i * 9 + k : kind === 1 ? k * 9 + i : (Math.floor(i / 3) * 3 + Math.floor(k / 3)) * 9 + (i % 3) * 3 + (k % 3),
  );
const UNITS = [0, 1, 2].flatMap((kind) => [...Array(9).keys()].map((i) => unit(kind, i)));

// cells: 81 strings ("1".."9" or anything else for unknown); clues: the 81-char puzzle.
// Returns the set of conflicting cells (a digit twice in a row, column or box, or a changed clue).
export function conflicts(cells, clues) {
  const bad = new Set();
  for (const members of UNITS) {
    const seen = new Map();
    for (const p of members) {
      if (!/^[1-9]$/.test(cells[p])) continue;
      if (seen.has(cells[p])) bad.add(p).add(seen.get(cells[p]));
      else seen.set(cells[p], p);
    }
  }
  cells.forEach((d, p) => clues[p] !== "." && d !== clues[p] && bad.add(p));
  return bad;
}

export function isSolved(cells, clues) {
  return cells.length === 81 && cells.every((d) => /^[1-9]$/.test(d)) && conflicts(cells, clues).size === 0;
}

export class SudokuBoard {
  constructor(container, puzzle) {
    this.clues = puzzle.trim();
    this.root = document.createElement("div");
    this.root.className = "sudoku";
    this.root.dataset.state = "solving";
    this.grid = document.createElement("div");
    this.grid.className = "board";
    this.caption = document.createElement("div");
    this.caption.className = "board-caption";
    this.cells = [...this.clues].map((clue, p) => {
      const cell = document.createElement("span");
      cell.className = clue === "." ? "cell" : "cell clue";
      cell.textContent = clue === "." ? "" : clue;
      if (p % 9 === 2 || p % 9 === 5) cell.classList.add("box-right");
      if (Math.floor(p / 9) === 2 || Math.floor(p / 9) === 5) cell.classList.add("box-bottom");
      this.grid.append(cell);
      return cell;
    });
    this.root.append(this.grid, this.caption);
    container.append(this.root);
  }

  // digits: 81 strings from the canvas (or the committed text); confidence: 0-100 per cell or null.
  render(digits, confidence, final) {
    const bad = conflicts(digits, this.clues);
    let filled = 0;
    digits.slice(0, 81).forEach((d, p) => {
      const cell = this.cells[p];
      const known = /^[1-9]$/.test(d);
      filled += known;
      if (this.clues[p] === ".") cell.textContent = known ? d : "";
      cell.classList.toggle("filled", known && this.clues[p] === ".");
      cell.classList.toggle("conflict", bad.has(p));
      cell.style.opacity = confidence && this.clues[p] === "." ? (0.4 + (confidence[p] ?? 100) / 166).toFixed(2) : "";
    });
    const solved = isSolved(digits.slice(0, 81), this.clues);
    this.root.dataset.state = solved ? "solved" : final ? "invalid" : "solving";
    this.caption.textContent = solved
      ? "solved: every row, column and box holds 1-9"
      : `${filled}/81 digits · ${bad.size} in conflict${final ? " · not a valid solution" : ""}`;
  }
}
