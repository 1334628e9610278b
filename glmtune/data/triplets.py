"""Synthetic Chinese triplet-extraction data for the demo task.

Sentences verbalise facts from a small random "world" (people, companies,
countries, cities, universities, books, years, industries) built from the
seed.  Facts come from one world so that a company has one headquarters and
one founder everywhere it appears, which keeps the data self-consistent; the
relation is always spelled out by the wording of its clause, so a tiny model
can learn it from the text alone.  A handful of well-known real entities
carry their real facts, so common demo sentences such as
``苹果公司是一家美国的科技公司。`` are in-distribution.

Everything random goes through one ``random.Random(seed)`` and every
collection that is iterated is a list or an insertion-ordered dict, never a
set, so the output depends only on the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from glmtune import atomic

INSTRUCTION = "请从以下文本中抽取三元组，格式为(主体, 关系, 客体):\n{text}"
NO_TRIPLET = "无"

TRAIN_FILE = "train_triplet.jsonl"
VAL_FILE = "val_triplet.jsonl"

RELATIONS = (
    "国籍", "行业", "总部位于", "创始人", "成立时间", "子公司",
    "出生地", "毕业院校", "首都", "作者", "出版时间", "所在城市",
)

# Long prompts cost a CPU run minutes; sentences above this are redrawn.
MAX_CHARS = 60
NO_TRIPLET_RATE = 0.09

# --------------------------------------------------------------------------
# Bundled name parts and real-world facts
# --------------------------------------------------------------------------

SURNAMES = list("王李张刘陈杨赵黄周吴徐孙胡朱高林何郭罗梁宋郑谢韩唐冯董程曹袁邓许傅沈彭吕苏卢蒋蔡魏叶杜")
GIVEN_NAMES = [
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰",
    "娟", "涛", "超", "霞", "刚", "桂英", "秀英", "建华", "建国", "志强", "晓明",
    "海燕", "文博", "子涵", "雨欣", "浩然", "思远", "欣怡", "宇轩", "梓萱", "一鸣",
    "嘉怡", "俊杰", "婉婷", "天佑", "家豪", "诗涵", "明轩", "晨曦", "若曦", "振华",
    "国栋", "春梅", "立新", "红霞", "佳琪", "子墨",
]
JOBS = ["工程师", "企业家", "教授", "医生", "律师", "设计师", "记者", "研究员"]

BRAND_FIRST = list("华星蓝天金瑞恒博云新中东宏启凯嘉鼎锦卓明汇")
BRAND_SECOND = list("远达泰丰盛兴宇信源创通联图辰航峰越光维诚")
COMPANY_SUFFIXES = ["公司", "公司", "公司", "集团"]
# Combinations that are real, well-known companies: made-up facts about them
# would read as misinformation.
REAL_BRANDS = ["中兴", "中远", "中信", "中通", "中航", "中联", "东航", "华航", "金光", "华信"]

BOOK_FIRST = [
    "山海", "星河", "长夜", "远方", "春风", "故园", "青石", "白鹭", "北风", "明月",
    "秋水", "云端", "江湖", "雪原", "灯火", "旧城", "南山", "孤岛", "黎明", "深海",
    "麦田", "小镇", "归途", "落日", "流年",
]
BOOK_SECOND = ["纪行", "往事", "之歌", "笔记", "旧梦", "来信", "札记", "漫记", "故事", "之夜", "手记", "随笔"]

INDUSTRIES = [
    "科技", "互联网", "医药", "汽车", "金融", "能源", "教育", "物流", "食品", "零售",
    "通信", "电子", "游戏", "化工", "航空", "传媒", "房地产", "软件", "农业", "服装",
    "半导体", "钢铁", "旅游",
]

CITIES_BY_COUNTRY = {
    "中国": ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "南京", "西安", "苏州",
           "天津", "重庆", "长沙", "青岛", "厦门", "合肥", "郑州", "济南", "大连", "宁波",
           "昆明", "哈尔滨", "沈阳", "福州", "无锡", "珠海", "贵阳", "南宁", "兰州", "长春"],
    "日本": ["东京", "大阪", "京都", "横滨", "名古屋", "福冈"],
    "韩国": ["首尔", "釜山", "仁川"],
    "美国": ["纽约", "旧金山", "西雅图", "波士顿", "芝加哥", "洛杉矶", "休斯顿"],
    "英国": ["伦敦", "曼彻斯特", "爱丁堡", "伯明翰"],
    "法国": ["巴黎", "里昂", "马赛"],
    "德国": ["柏林", "慕尼黑", "汉堡", "法兰克福"],
    "意大利": ["罗马", "米兰", "都灵"],
    "加拿大": ["多伦多", "温哥华", "蒙特利尔"],
    "澳大利亚": ["悉尼", "墨尔本"],
}

CAPITALS = {
    "中国": "北京", "日本": "东京", "韩国": "首尔", "美国": "华盛顿", "英国": "伦敦",
    "法国": "巴黎", "德国": "柏林", "意大利": "罗马", "加拿大": "渥太华", "澳大利亚": "堪培拉",
    "俄罗斯": "莫斯科", "西班牙": "马德里", "巴西": "巴西利亚", "印度": "新德里", "埃及": "开罗",
    "泰国": "曼谷", "越南": "河内", "荷兰": "阿姆斯特丹", "瑞典": "斯德哥尔摩", "挪威": "奥斯陆",
    "芬兰": "赫尔辛基", "波兰": "华沙", "土耳其": "安卡拉", "阿根廷": "布宜诺斯艾利斯",
    "墨西哥": "墨西哥城", "葡萄牙": "里斯本", "希腊": "雅典", "奥地利": "维也纳",
    "新西兰": "惠灵顿", "肯尼亚": "内罗毕", "印度尼西亚": "雅加达", "马来西亚": "吉隆坡",
    "菲律宾": "马尼拉", "爱尔兰": "都柏林", "丹麦": "哥本哈根", "比利时": "布鲁塞尔",
    "匈牙利": "布达佩斯", "智利": "圣地亚哥", "秘鲁": "利马", "伊朗": "德黑兰",
}

# University -> city; None where the campus town is easy to get wrong.
UNIVERSITIES = {
    "北京大学": "北京", "清华大学": "北京", "中国人民大学": "北京", "北京师范大学": "北京",
    "复旦大学": "上海", "同济大学": "上海", "上海交通大学": "上海", "华东师范大学": "上海",
    "浙江大学": "杭州", "杭州师范大学": "杭州", "南京大学": "南京", "东南大学": "南京",
    "武汉大学": "武汉", "华中科技大学": "武汉", "中山大学": "广州", "四川大学": "成都",
    "山东大学": "济南", "厦门大学": "厦门", "南开大学": "天津", "西安交通大学": "西安",
    "哈尔滨工业大学": "哈尔滨", "中国科学技术大学": "合肥", "湖南大学": "长沙", "重庆大学": "重庆",
    "兰州大学": "兰州", "大连理工大学": "大连", "深圳大学": "深圳", "吉林大学": "长春",
    "东京大学": "东京", "京都大学": "京都", "早稻田大学": "东京", "首尔大学": "首尔",
    "多伦多大学": "多伦多", "剑桥大学": "剑桥", "牛津大学": "牛津", "慕尼黑工业大学": "慕尼黑",
    "墨尔本大学": "墨尔本", "悉尼大学": "悉尼", "哈佛大学": None, "斯坦福大学": None,
    "麻省理工学院": None,
}

# Real people with only the facts we are sure of.
FAMOUS_PEOPLE = {
    "史蒂夫·乔布斯": {"国籍": "美国", "出生地": "旧金山"},
    "比尔·盖茨": {"国籍": "美国", "出生地": "西雅图"},
    "任正非": {"国籍": "中国"},
    "马化腾": {"国籍": "中国", "毕业院校": "深圳大学"},
    "马云": {"国籍": "中国", "出生地": "杭州", "毕业院校": "杭州师范大学"},
    "雷军": {"国籍": "中国", "出生地": "仙桃", "毕业院校": "武汉大学"},
    "李彦宏": {"国籍": "中国", "出生地": "阳泉", "毕业院校": "北京大学"},
    "刘强东": {"国籍": "中国", "出生地": "宿迁", "毕业院校": "中国人民大学"},
    "王传福": {"国籍": "中国"},
    "井深大": {"国籍": "日本", "毕业院校": "早稻田大学"},
    "丰田喜一郎": {"国籍": "日本", "毕业院校": "东京大学"},
    "鲁迅": {"国籍": "中国", "出生地": "绍兴"},
    "老舍": {"国籍": "中国", "出生地": "北京"},
    "巴金": {"国籍": "中国", "出生地": "成都"},
    "沈从文": {"国籍": "中国", "出生地": "凤凰"},
    "钱钟书": {"国籍": "中国", "出生地": "无锡", "毕业院校": "清华大学"},
    "余华": {"国籍": "中国", "出生地": "杭州"},
    "路遥": {"国籍": "中国", "出生地": "清涧"},
    "曹雪芹": {}, "吴承恩": {}, "罗贯中": {}, "施耐庵": {},
}

FAMOUS_COMPANIES = {
    "苹果公司": {"国籍": "美国", "行业": "科技", "总部位于": "库比蒂诺", "创始人": "史蒂夫·乔布斯", "成立时间": "1976年"},
    "微软公司": {"国籍": "美国", "行业": "软件", "总部位于": "雷德蒙德", "创始人": "比尔·盖茨", "成立时间": "1975年"},
    "华为公司": {"国籍": "中国", "行业": "通信", "总部位于": "深圳", "创始人": "任正非", "成立时间": "1987年"},
    "腾讯公司": {"国籍": "中国", "行业": "互联网", "总部位于": "深圳", "创始人": "马化腾", "成立时间": "1998年"},
    "阿里巴巴集团": {"国籍": "中国", "行业": "互联网", "总部位于": "杭州", "创始人": "马云", "成立时间": "1999年"},
    "小米公司": {"国籍": "中国", "行业": "科技", "总部位于": "北京", "创始人": "雷军", "成立时间": "2010年"},
    "百度公司": {"国籍": "中国", "行业": "互联网", "总部位于": "北京", "创始人": "李彦宏", "成立时间": "2000年"},
    "京东集团": {"国籍": "中国", "行业": "零售", "总部位于": "北京", "创始人": "刘强东", "成立时间": "1998年"},
    "比亚迪公司": {"国籍": "中国", "行业": "汽车", "总部位于": "深圳", "创始人": "王传福", "成立时间": "1995年"},
    "索尼公司": {"国籍": "日本", "行业": "电子", "总部位于": "东京", "创始人": "井深大", "成立时间": "1946年"},
    "丰田汽车公司": {"国籍": "日本", "行业": "汽车", "总部位于": "丰田市", "创始人": "丰田喜一郎", "成立时间": "1937年"},
}

FAMOUS_BOOKS = {
    "红楼梦": {"作者": "曹雪芹"}, "西游记": {"作者": "吴承恩"}, "三国演义": {"作者": "罗贯中"},
    "水浒传": {"作者": "施耐庵"}, "呐喊": {"作者": "鲁迅", "出版时间": "1923年"},
    "朝花夕拾": {"作者": "鲁迅"}, "围城": {"作者": "钱钟书", "出版时间": "1947年"},
    "活着": {"作者": "余华"}, "平凡的世界": {"作者": "路遥"}, "边城": {"作者": "沈从文"},
    "骆驼祥子": {"作者": "老舍"}, "家": {"作者": "巴金"},
}

# --------------------------------------------------------------------------
# Templates.  Keyed by (relation, subject type); "s" renders a fact with the
# subject as the topic of the clause, "o" with the object as the topic.  The
# "cont" forms drop the topic so a clause can continue the previous one
# ("张伟出生于杭州，毕业于浙江大学"), the way Chinese usually chains facts.
# --------------------------------------------------------------------------

TEMPLATES: dict[tuple[str, str], dict[str, dict[str, list[str]]]] = {
    ("国籍", "person"): {"s": {
        "full": ["{s}是{o}人", "{s}拥有{o}国籍", "{s}是一名{o}籍{job}", "{s}的国籍是{o}"],
        "cont": ["是{o}人", "拥有{o}国籍", "国籍为{o}"]}},
    ("国籍", "company"): {"s": {
        "full": ["{s}是一家{o}企业", "{s}是一家来自{o}的公司", "{s}是{o}的一家企业"],
        "cont": ["是一家{o}企业", "来自{o}"]}},
    ("行业", "company"): {"s": {
        "full": ["{s}主要从事{o}行业", "{s}专注于{o}领域", "{s}属于{o}行业", "{s}的主营业务是{o}"],
        "cont": ["主要从事{o}行业", "专注于{o}领域", "业务集中在{o}领域"]}},
    ("总部位于", "company"): {"s": {
        "full": ["{s}总部位于{o}", "{s}的总部设在{o}", "{s}总部在{o}"],
        "cont": ["总部位于{o}", "总部设在{o}"]}},
    ("创始人", "company"): {
        "s": {"full": ["{s}由{o}创办", "{s}的创始人是{o}", "{s}由{o}一手创立"],
              "cont": ["由{o}创办", "创始人是{o}"]},
        "o": {"full": ["{o}创立了{s}", "{o}是{s}的创始人", "{o}一手创办了{s}"],
              "cont": ["创立了{s}", "后来创办了{s}"]}},
    ("成立时间", "company"): {"s": {
        "full": ["{s}成立于{o}", "{s}创建于{o}", "{s}于{o}正式成立"],
        "cont": ["成立于{o}", "于{o}成立", "创建于{o}"]}},
    ("子公司", "company"): {
        "s": {"full": ["{s}旗下拥有子公司{o}", "{s}的子公司包括{o}"],
              "cont": ["旗下拥有子公司{o}", "控股子公司{o}"]},
        "o": {"full": ["{o}是{s}的子公司", "{o}是{s}旗下的全资子公司"],
              "cont": ["是{s}的子公司", "隶属于{s}"]}},
    ("出生地", "person"): {"s": {
        "full": ["{s}出生于{o}", "{s}生于{o}", "{s}的出生地是{o}", "{s}在{o}出生"],
        "cont": ["出生于{o}", "生于{o}"]}},
    ("毕业院校", "person"): {"s": {
        "full": ["{s}毕业于{o}", "{s}是{o}的毕业生", "{s}从{o}毕业"],
        "cont": ["毕业于{o}", "后来从{o}毕业"]}},
    ("首都", "country"): {
        "s": {"full": ["{s}的首都是{o}", "{s}首都是{o}"], "cont": ["首都是{o}"]},
        "o": {"full": ["{o}是{s}的首都", "{o}是{s}的首都城市"], "cont": ["是{s}的首都"]}},
    ("作者", "book"): {
        "s": {"full": ["《{s}》的作者是{o}", "《{s}》是{o}创作的小说", "《{s}》出自{o}之手", "小说《{s}》由{o}所著"],
              "cont": ["作者是{o}", "由{o}创作"]},
        "o": {"full": ["{o}写了《{s}》", "{o}创作了小说《{s}》", "{o}是《{s}》的作者"],
              "cont": ["著有《{s}》", "写过小说《{s}》"]}},
    ("出版时间", "book"): {"s": {
        "full": ["《{s}》出版于{o}", "《{s}》于{o}出版", "《{s}》首次出版是在{o}"],
        "cont": ["出版于{o}", "于{o}首次出版"]}},
    ("所在城市", "university"): {"s": {
        "full": ["{s}位于{o}", "{s}坐落在{o}", "{s}地处{o}"],
        "cont": ["位于{o}", "坐落在{o}"]}},
}

# One clause, two facts about a company.  The first shape is the demo
# sentence everyone tries first, so it must be well represented.
COMBO_TEMPLATES = {
    ("国籍", "行业"): ["{s}是一家{o1}的{o2}公司", "{s}是一家{o1}的{o2}公司",
                     "{s}是{o1}的一家{o2}企业", "{s}是一家来自{o1}的{o2}公司"],
    ("创始人", "成立时间"): ["{s}由{o1}于{o2}创办", "{s}由{o1}创立于{o2}"],
}

# Clauses that mention entities but state none of the relations: they teach
# the model that a name alone is not a triplet.
NEGATIVE_TEMPLATES = [
    "{p}昨天去{city}旅游了", "{p}正在读《{b}》", "{c}发布了新一季的财报", "{c}的新产品很受欢迎",
    "{city}的冬天比较冷", "{p}觉得{city}的美食很好吃", "{p}在{u}做了一场讲座",
    "{c}宣布将在{city}举办发布会", "{p}下周要去{n}出差", "{n}队赢得了比赛", "{p}和{p2}是多年的好朋友",
    "{c}的股价今天上涨了", "{u}今年的招生人数有所增加", "很多读者喜欢《{b}》", "{p}打算明年去{n}旅行",
    "{city}今天下了一场大雨", "{c}正在招聘新员工", "{p}参观了{c}的展厅", "{p}推荐大家读一读《{b}》",
]
CHITCHAT = [
    "今天天气很好", "外面下着小雨", "这件事引起了广泛关注", "很多人对此表示赞赏", "大家都觉得很有意思",
    "这个消息让人有些意外", "网友们议论纷纷", "现场气氛十分热烈", "我个人觉得挺好的", "周末的公园里人很多",
    "这家餐厅的菜味道不错", "最近工作有点忙", "据说效果还不错", "这一观点值得商榷",
]


# --------------------------------------------------------------------------
# World
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Fact:
    s: str
    r: str
    o: str
    stype: str

    @property
    def triplet(self) -> tuple[str, str, str]:
        return (self.s, self.r, self.o)


class _World:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.facts: list[_Fact] = []
        self.jobs: dict[str, str] = {}
        self.people: list[str] = []
        self.companies: list[str] = []
        self.books: list[str] = []
        self.cities: list[str] = [c for cs in CITIES_BY_COUNTRY.values() for c in cs]
        self.countries: list[str] = list(CAPITALS)
        self.universities: list[str] = list(UNIVERSITIES)
        self._places = self.cities + self.countries + list(CAPITALS.values())
        self._build()
        # topic entity -> [(fact, role)]; a list so picks are seed-stable.
        self.by_topic: dict[str, list[tuple[_Fact, str]]] = {}
        for fact in self.facts:
            roles = TEMPLATES[(fact.r, fact.stype)]
            self.by_topic.setdefault(fact.s, []).append((fact, "s"))
            if "o" in roles:
                self.by_topic.setdefault(fact.o, []).append((fact, "o"))
        self.topics = list(self.by_topic)
        self.company_facts: dict[str, dict[str, str]] = {}
        for fact in self.facts:
            if fact.stype == "company":
                self.company_facts.setdefault(fact.s, {})[fact.r] = fact.o

    def _clashes(self, name: str, taken: list[str]) -> bool:
        # A name inside a place name (or the reverse) would make the literal
        # span of one entity ambiguous with another.
        return any(p in name or name in p for p in self._places) or name in taken

    def _add(self, s, r, o, stype):
        self.facts.append(_Fact(s, r, o, stype))

    def _unique_names(self, n, make, taken):
        names: list[str] = []
        while len(names) < n:
            name = make()
            if not self._clashes(name, taken + names):
                names.append(name)
        return names

    def _build(self):
        rng = self.rng
        famous_people = list(FAMOUS_PEOPLE)

        for country, capital in CAPITALS.items():
            self._add(country, "首都", capital, "country")
        for uni, city in UNIVERSITIES.items():
            if city is not None:
                self._add(uni, "所在城市", city, "university")

        # People.
        foreign = [c for c in CITIES_BY_COUNTRY if c != "中国"]
        local_unis = [u for u, c in UNIVERSITIES.items() if c in CITIES_BY_COUNTRY["中国"]]
        people = self._unique_names(
            170, lambda: rng.choice(SURNAMES) + rng.choice(GIVEN_NAMES), famous_people)
        citizens: dict[str, list[str]] = {}
        for person in people:
            country = "中国" if rng.random() < 0.7 else rng.choice(foreign)
            citizens.setdefault(country, []).append(person)
            if country == "中国":
                # Some study abroad.
                pool = local_unis if rng.random() < 0.85 else list(UNIVERSITIES)
            else:
                pool = [u for u, c in UNIVERSITIES.items()
                        if c in CITIES_BY_COUNTRY[country]] or list(UNIVERSITIES)
            self.jobs[person] = rng.choice(JOBS)
            self._add(person, "国籍", country, "person")
            self._add(person, "出生地", rng.choice(CITIES_BY_COUNTRY[country]), "person")
            self._add(person, "毕业院校", rng.choice(pool), "person")
        for person, facts in FAMOUS_PEOPLE.items():
            self.jobs[person] = "作家" if person in ("鲁迅", "老舍", "巴金", "沈从文", "钱钟书", "余华", "路遥") else "企业家"
            for rel, obj in facts.items():
                self._add(person, rel, obj, "person")

        # Companies.
        def brand() -> str:
            while True:
                first = rng.choice(BRAND_FIRST)
                name = first + rng.choice([c for c in BRAND_SECOND if c != first])
                if name not in REAL_BRANDS:
                    return name

        brands = self._unique_names(140, brand, famous_people + people)
        companies = [b + rng.choice(COMPANY_SUFFIXES) for b in brands]
        for company in companies:
            country = "中国" if rng.random() < 0.6 else rng.choice(foreign)
            # Founders share the company's nationality, as they mostly do.
            compatriots = citizens.get(country) or people
            self._add(company, "国籍", country, "company")
            self._add(company, "行业", rng.choice(INDUSTRIES), "company")
            self._add(company, "总部位于", rng.choice(CITIES_BY_COUNTRY[country]), "company")
            self._add(company, "创始人", rng.choice(compatriots), "company")
            self._add(company, "成立时间", f"{rng.randint(1950, 2022)}年", "company")
        # Each child gets one parent from the first half: no cycles, no
        # company claimed by two groups.
        half = len(companies) // 2
        for child in companies[half:]:
            if rng.random() < 0.6:
                self._add(rng.choice(companies[:half]), "子公司", child, "company")
        for company, facts in FAMOUS_COMPANIES.items():
            for rel, obj in facts.items():
                self._add(company, rel, obj, "company")

        # Books.
        titles: list[str] = []
        while len(titles) < 90:
            title = rng.choice(BOOK_FIRST) + rng.choice(BOOK_SECOND)
            if title not in titles:
                titles.append(title)
        self.books = titles
        for title in titles:
            self._add(title, "作者", rng.choice(people), "book")
            if rng.random() < 0.7:
                self._add(title, "出版时间", f"{rng.randint(1950, 2023)}年", "book")
        for title, facts in FAMOUS_BOOKS.items():
            for rel, obj in facts.items():
                self._add(title, rel, obj, "book")

        # Chit-chat clauses only name made-up people: "吴承恩下周要去智利出差"
        # would be absurd.
        self.chat_people = people
        self.people = people + famous_people
        self.companies = companies + list(FAMOUS_COMPANIES)
        self.books = titles + list(FAMOUS_BOOKS)


# --------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------

def _render(rng: random.Random, world: _World, fact: _Fact, role: str, full: bool) -> str:
    forms = TEMPLATES[(fact.r, fact.stype)][role]
    template = rng.choice(forms["full" if full else "cont"])
    return template.format(s=fact.s, o=fact.o, job=world.jobs.get(fact.s, "学者"))


def _negative_clause(rng: random.Random, world: _World) -> str:
    if rng.random() < 0.3:
        return rng.choice(CHITCHAT)
    p, p2 = rng.sample(world.chat_people, 2)
    return rng.choice(NEGATIVE_TEMPLATES).format(
        p=p, p2=p2, c=rng.choice(world.companies), city=rng.choice(world.cities),
        b=rng.choice(world.books), u=rng.choice(world.universities), n=rng.choice(world.countries))


def _topic_clauses(rng, world, k):
    """Up to k facts about one entity, later clauses usually dropping the subject."""
    # Companies carry the most facts and the demo's favourite sentence shape,
    # so they are the topic more often than their share of entities.
    topic = rng.choice(world.companies if rng.random() < 0.3 else world.topics)
    entries = list(world.by_topic[topic])
    rng.shuffle(entries)
    clauses: list[str] = []
    triplets: list[tuple[str, str, str]] = []

    facts = world.company_facts.get(topic)
    if facts is not None and rng.random() < 0.5:
        pair = rng.choices(list(COMBO_TEMPLATES), weights=[3, 1])[0]
        if all(r in facts for r in pair):
            template = rng.choice(COMBO_TEMPLATES[pair])
            clauses.append(template.format(s=topic, o1=facts[pair[0]], o2=facts[pair[1]]))
            triplets += [(topic, pair[0], facts[pair[0]]), (topic, pair[1], facts[pair[1]])]
            entries = [(f, role) for f, role in entries if not (role == "s" and f.r in pair)]
            k = max(k - 2, 0)

    for fact, role in entries[:k]:
        # After a company-to-company clause a subject-less clause could attach
        # to either company, so the subject is repeated there.
        full = not clauses or rng.random() < 0.25 or (triplets and triplets[-1][1] == "子公司")
        clauses.append(_render(rng, world, fact, role, full))
        triplets.append(fact.triplet)
    return clauses, triplets


def _positive(rng: random.Random, world: _World):
    k = rng.choices([1, 2, 3], weights=[45, 35, 20])[0]
    if rng.random() < 0.7:
        clauses, triplets = _topic_clauses(rng, world, k)
    else:
        clauses, triplets = [], []
        for topic in rng.sample(world.topics, k):
            fact, role = rng.choice(world.by_topic[topic])
            clauses.append(_render(rng, world, fact, role, True))
            triplets.append(fact.triplet)
    if len(set(triplets)) != len(triplets):
        return None
    # Distractors go only at the ends: in the middle they would break the
    # subject a following subject-less clause refers back to.
    if rng.random() < 0.2:
        distractor = _negative_clause(rng, world)
        if rng.random() < 0.5:
            clauses.insert(0, distractor)
        else:
            clauses.append(distractor)
    return "，".join(clauses) + "。", triplets


def _negative(rng: random.Random, world: _World):
    n = rng.choices([1, 2], weights=[60, 40])[0]
    return "，".join(_negative_clause(rng, world) for _ in range(n)) + "。", []


def format_triplets(triplets: list[tuple[str, str, str]]) -> str:
    if not triplets:
        return NO_TRIPLET
    return "\n".join(f"({s}, {r}, {o})" for s, r, o in triplets)


def _row(text: str, triplets) -> dict:
    return {"prompt": INSTRUCTION.format(text=text), "response": format_triplets(triplets)}


def _unique(rng, world, make, n, seen: set[str]) -> list[tuple[str, list]]:
    out: list[tuple[str, list]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct sentences; ask for fewer")
        item = make(rng, world)
        if item is None:
            continue
        text, triplets = item
        if len(text) > MAX_CHARS or text in seen:
            continue
        seen.add(text)
        out.append((text, triplets))
    return out


# 4,000 training rows, not the 900 we started with: on 900 rows tiny-glm memorises
# (training loss 0.003, validation loss stuck at 0.24, F1 0.66), on 4,000 it must
# learn to copy from the sentence (validation loss 0.06, F1 0.85) in the same steps.
DEFAULT_TRAIN_ROWS = 4000
DEFAULT_VAL_ROWS = 100


def generate(n_train: int = DEFAULT_TRAIN_ROWS, n_val: int = DEFAULT_VAL_ROWS, seed: int = 42) -> tuple[list[dict], list[dict]]:
    """Rows are {"prompt": INSTRUCTION.format(text=sentence), "response": "(主体, 关系, 客体)\\n(…)" or "无"}."""
    for name, value in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    rng = random.Random(seed)
    world = _World(rng)

    # Both splits get the same share of 无 rows, so validation measures the
    # same mix the model was trained on.
    neg_train = round(n_train * NO_TRIPLET_RATE)
    neg_val = round(n_val * NO_TRIPLET_RATE)
    seen: set[str] = set()
    positives = _unique(rng, world, _positive, n_train - neg_train + n_val - neg_val, seen)
    negatives = _unique(rng, world, _negative, neg_train + neg_val, seen)

    # Every sentence is unique before the split, so no validation sentence
    # can equal a training one.
    pos_val_n = n_val - neg_val
    val = positives[:pos_val_n] + negatives[:neg_val]
    train = positives[pos_val_n:] + negatives[neg_val:]
    rng.shuffle(train)
    rng.shuffle(val)
    return [_row(*item) for item in train], [_row(*item) for item in val]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic.write_lines(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write(out_dir, n_train: int = DEFAULT_TRAIN_ROWS, n_val: int = DEFAULT_VAL_ROWS, seed: int = 42) -> tuple[Path, Path]:
    """Write out_dir/train_triplet.jsonl and out_dir/val_triplet.jsonl; return both paths.

    Each file is written to a temporary sibling and moved into place, so an
    interrupted run never leaves a half-written file behind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = generate(n_train, n_val, seed)
    train_path, val_path = out / TRAIN_FILE, out / VAL_FILE
    _write_jsonl(train_path, train)
    _write_jsonl(val_path, val)
    return train_path, val_path
